package app

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/providers"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// RedisConfig selects single node, Sentinel or Cluster through go-redis's
// UniversalClient: a master name means Sentinel, several addresses Cluster.
type RedisConfig struct {
	Addrs      []string
	MasterName string
	// Username and Password log in as an ACL user; Password alone logs in
	// as the default user (requirepass). With Sentinel they apply to the
	// master and replicas, not to the Sentinels.
	Username string
	Password string
	// TLS speaks TLS 1.2 or later to every address: each Cluster node, or
	// the Sentinels and the master they name. The server certificate is
	// verified, against TLSCAFile or else the system roots, for
	// TLSServerName or else the host of the address dialled.
	TLS bool
	// TLSCAFile holds the PEM CA certificates trusted to sign the server
	// certificates; empty means the system roots.
	TLSCAFile string
	// TLSCertFile and TLSKeyFile are a PEM client certificate and key, for
	// servers that check clients (tls-auth-clients). They are read once,
	// at NewRedis: a rotated client certificate takes a restart.
	TLSCertFile string
	TLSKeyFile  string
	// TLSServerName is the name the server certificates must carry, when
	// it is not the host in the address, e.g. with addresses given as IPs.
	// In a Cluster every node is checked against it, so it suits only a
	// certificate shared by all nodes.
	TLSServerName string
	// Timeout bounds dial, read and write of every Redis call.
	Timeout time.Duration
}

// tlsConfig returns the client TLS configuration cfg asks for, or nil for
// plaintext.
func (cfg RedisConfig) tlsConfig() (*tls.Config, error) {
	if !cfg.TLS {
		// A TLS file without TLS is a configuration mistake that would
		// otherwise send the password in plaintext.
		if cfg.TLSCAFile != "" || cfg.TLSCertFile != "" || cfg.TLSKeyFile != "" || cfg.TLSServerName != "" {
			return nil, errors.New("redis: TLS files or server name given without TLS (--redis-tls)")
		}
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.TLSServerName}
	if cfg.TLSCAFile != "" {
		pem, err := os.ReadFile(cfg.TLSCAFile)
		if err != nil {
			return nil, fmt.Errorf("redis: TLS CA: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("redis: TLS CA: no PEM certificate in %s", cfg.TLSCAFile)
		}
	}
	if (cfg.TLSCertFile == "") != (cfg.TLSKeyFile == "") {
		return nil, errors.New("redis: set both the TLS client certificate and key, or neither")
	}
	if cfg.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("redis: TLS client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// NewRedis returns a connected client, or an error if PING fails.
func NewRedis(ctx context.Context, cfg RedisConfig) (redis.UniversalClient, error) {
	if len(cfg.Addrs) == 0 {
		return nil, fmt.Errorf("redis: no address configured (--redis-addr)")
	}
	tlsConfig, err := cfg.tlsConfig()
	if err != nil {
		return nil, err
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	client := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:        cfg.Addrs,
		MasterName:   cfg.MasterName,
		Username:     cfg.Username,
		Password:     cfg.Password,
		TLSConfig:    tlsConfig,
		DialTimeout:  timeout,
		ReadTimeout:  timeout,
		WriteTimeout: timeout,
		// Without this go-redis ignores the caller's deadline for socket I/O.
		ContextTimeoutEnabled: true,
	})
	pingCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := client.Ping(pingCtx).Err(); err != nil {
		client.Close()
		return nil, fmt.Errorf("redis: ping %v: %w", cfg.Addrs, err)
	}
	return client, nil
}

// VaultConfig is how a service reaches Vault transit.
type VaultConfig = transit.VaultConfig

// NewVault connects to Vault transit; the caller must Close it.
func NewVault(ctx context.Context, cfg VaultConfig, logger *slog.Logger) (*transit.Vault, error) {
	if cfg.Addr == "" {
		return nil, fmt.Errorf("vault: no address configured (--vault-addr)")
	}
	if cfg.Token == "" && (cfg.Auth.Method == "" || cfg.Auth.Method == transit.AuthToken) {
		return nil, fmt.Errorf("vault: no token configured (--vault-token or FLEETBROKER_VAULT_TOKEN), and no --vault-auth-method to log in with")
	}
	v, err := transit.NewVault(ctx, cfg, logger)
	if err != nil {
		return nil, fmt.Errorf("vault: %w", err)
	}
	return v, nil
}

// newProviders builds a process's provider registry from factories (nil:
// every provider fleetbroker serves) on the one HTTP client shape for
// provider calls: a timeout on every request, a transport that dials only
// addresses the allow-list permits (checked on the address actually
// dialed, so DNS cannot aim it at internal services), and latency/status
// metrics by provider and endpoint in m (nil: not measured). The providers
// share one transport, and so its connection pool. Egress proxies are not
// supported: through one, the address check would see the proxy, not the
// upstream.
func newProviders(factories []provider.Factory, timeout time.Duration, allow *upstream.AllowList, m *telemetry.Metrics, tuning provider.Tuning, logger *slog.Logger) (*provider.Registry, error) {
	if factories == nil {
		factories = providers.All()
	}
	base := upstream.NewTransport(allow)
	env := provider.Env{
		HTTPClient: func(name string) *http.Client {
			return &http.Client{Timeout: timeout, Transport: telemetry.InstrumentTransport(base, name, m)}
		},
		Tuning: tuning,
		Logger: logger,
	}
	reg, err := provider.NewRegistry(env, factories...)
	if err != nil {
		return nil, fmt.Errorf("providers: %w", err)
	}
	return reg, nil
}
