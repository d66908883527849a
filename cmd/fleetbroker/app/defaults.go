package app

import (
	"errors"
	"fmt"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// Defaults of the settings every subcommand shares, and of those of one
// subcommand that no service package owns. The flags show them as their
// defaults and SetDefaults fills them into a config built in code; a value
// a service package owns (server.DefaultGracePeriod,
// credentials.DefaultMaxSessionTTL, gateway.DefaultHandleCacheTTL, ...) is
// written there once and named here and in the flags.
const (
	DefaultCredentialsListen        = ":7401"
	DefaultCredentialsMetricsListen = "localhost:9401"
	DefaultGatewayListen            = ":7402"
	DefaultGatewayMetricsListen     = "localhost:9402"
	// DefaultCredentialsAddr is where the gateway finds the credentials service.
	DefaultCredentialsAddr = "localhost:7401"

	DefaultRedisAddr    = "localhost:6379"
	DefaultRedisTimeout = 2 * time.Second
	DefaultRedisPrefix  = keyspace.DefaultPrefix

	DefaultVaultMount = transit.DefaultVaultMount
	// DefaultCredentialsTransitKey seals customer secrets;
	// DefaultGatewayTransitKey wraps the gateway's data keys only.
	DefaultCredentialsTransitKey = transit.DefaultVaultKey
	DefaultGatewayTransitKey     = "fleetbroker-gateway"
	DefaultVaultTimeout          = transit.DefaultVaultTimeout

	DefaultUpstreamTimeout = provider.DefaultUpstreamTimeout
	DefaultFleetUpRate     = fleetup.DefaultAccountRate
	DefaultFleetUpBurst    = fleetup.DefaultAccountBurst

	// DefaultAuditLog is stderr.
	DefaultAuditLog = "-"
	// DefaultWialonAccessType is the least a read-only integration needs:
	// online tracking.
	DefaultWialonAccessType = "0x100"

	DefaultLogLevel = "info"
)

// SetDefaults fills the settings left empty with the defaults the flags
// show, as far as an empty value is not itself a setting.
func (cfg *RedisConfig) SetDefaults() {
	if len(cfg.Addrs) == 0 {
		cfg.Addrs = []string{DefaultRedisAddr}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultRedisTimeout
	}
}

// validate checks cfg without reading a file or dialling.
func (cfg RedisConfig) validate() error {
	var errs []error
	if len(cfg.Addrs) == 0 {
		errs = append(errs, errors.New("redis: no address configured (--redis-addr)"))
	}
	if !cfg.TLS && (cfg.TLSCAFile != "" || cfg.TLSCertFile != "" || cfg.TLSKeyFile != "" || cfg.TLSServerName != "") {
		// A TLS file without TLS would otherwise send the password in plaintext.
		errs = append(errs, errors.New("redis: TLS files or server name given without TLS (--redis-tls)"))
	}
	if (cfg.TLSCertFile == "") != (cfg.TLSKeyFile == "") {
		errs = append(errs, errors.New("redis: set both the TLS client certificate and key, or neither"))
	}
	return errors.Join(errs...)
}

// setVaultDefaults fills an empty mount, key (key: the service's) and timeout.
func setVaultDefaults(cfg *VaultConfig, key string) {
	if cfg.Mount == "" {
		cfg.Mount = DefaultVaultMount
	}
	if cfg.Key == "" {
		cfg.Key = key
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultVaultTimeout
	}
}

// validateVault checks cfg without contacting Vault, naming the flags.
func validateVault(cfg VaultConfig) error {
	switch {
	case cfg.Addr == "":
		return errors.New("vault: no address configured (--vault-addr)")
	case cfg.Token == "" && (cfg.Auth.Method == "" || cfg.Auth.Method == transit.AuthToken):
		return errors.New("vault: no token configured (--vault-token or FLEETBROKER_VAULT_TOKEN), and no --vault-auth-method to log in with")
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("vault: %w", err)
	}
	return nil
}

// setServerDefaults fills the gRPC server settings left empty.
func setServerDefaults(cfg *server.Config, listen string) {
	if cfg.Listen == "" {
		cfg.Listen = listen
	}
	if cfg.GracePeriod <= 0 {
		cfg.GracePeriod = server.DefaultGracePeriod
	}
	if cfg.DefaultDeadline <= 0 {
		cfg.DefaultDeadline = server.DefaultDeadline
	}
	if cfg.MaxRecvMsgSize <= 0 {
		cfg.MaxRecvMsgSize = server.DefaultMaxRecvMsgSize
	}
}

// SetDefaults fills an empty audit trail with stderr.
func (sec *SecurityConfig) SetDefaults() {
	if sec.AuditLog == "" {
		sec.AuditLog = DefaultAuditLog
	}
}

// validate checks the security settings without reading a file: TLS or
// --insecure, a policy where one is required, the proxy settings.
func (sec SecurityConfig) validate(policyRequired bool) error {
	var errs []error
	switch {
	case (sec.TLSCert == "") != (sec.TLSKey == ""):
		errs = append(errs, errors.New("--tls-cert and --tls-key go together"))
	case sec.TLSCert == "" && sec.TLSClientCA != "":
		errs = append(errs, errors.New("--tls-client-ca needs --tls-cert and --tls-key"))
	case sec.TLSCert == "" && !sec.Insecure:
		errs = append(errs, errPlaintext)
	}
	switch {
	case sec.PolicyFile != "":
		if _, err := policy.FormatForPath(sec.PolicyFile); err != nil {
			errs = append(errs, fmt.Errorf("--policy: %w", err))
		}
	case policyRequired:
		errs = append(errs, errPolicyRequired)
	}
	if sec.TrustedHeader != "" && !sec.Insecure {
		errs = append(errs, errors.New("--trusted-header is only for --insecure behind a mesh sidecar"))
	}
	if _, err := parsePrefixes(sec.TrustedProxies); err != nil {
		errs = append(errs, fmt.Errorf("--trusted-proxies: %w", err))
	}
	if sec.RateLimitPrincipal < 0 || sec.RateLimitSession < 0 || sec.RateLimitTenant < 0 {
		errs = append(errs, errors.New("--rate-limit-principal, --rate-limit-session and --rate-limit-tenant must not be negative"))
	}
	return errors.Join(errs...)
}

var (
	errPlaintext = errors.New("refusing to serve plaintext: set --tls-cert and --tls-key, or --insecure behind a sidecar that terminates mTLS")

	errPolicyRequired = errors.New("--policy is required: it says which principal may do what for which tenant (see docs/security.md)")

	errHandleKeyFileRequired = errors.New("--handle-key-file is required: the keys that sign session handles, shared by the credentials service and the gateway " +
		"(one base64 key of 32 random bytes per line; make one with: head -c 32 /dev/urandom | base64)")
)

// problems collects every problem of a configuration, so Validate reports
// them all at once.
type problems []error

func (p *problems) add(err error) {
	if err != nil {
		*p = append(*p, err)
	}
}

func (p problems) err() error { return errors.Join(p...) }
