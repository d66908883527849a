package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// parse parses args and then fills every flag not given on the command line
// from FLEETBROKER_<NAME>, so each setting has exactly one name in each form.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if setErr := fs.Set(f.Name, v); setErr != nil {
				err = fmt.Errorf("%s: %w", envName(f.Name), setErr)
			}
		}
	})
	return err
}

func envName(flagName string) string {
	return "FLEETBROKER_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

type logFlags struct{ format, level string }

func addLogFlags(fs *flag.FlagSet, format string) *logFlags {
	l := &logFlags{}
	fs.StringVar(&l.format, "log-format", format, "log format: json or text")
	fs.StringVar(&l.level, "log-level", app.DefaultLogLevel, "log level: debug, info, warn or error")
	return l
}

// addServingFlags adds the flags of every gRPC server subcommand: the
// listener, deadlines and message size, the connection settings a mesh
// needs, the metrics listener, and security (policyHelp describes --policy).
func addServingFlags(fs *flag.FlagSet, srv *server.Config, sec *app.SecurityConfig, metricsListen *string, listen, metricsDefault, policyHelp string) {
	addServerFlags(fs, srv, listen)
	addDeadlineFlags(fs, srv)
	addMeshFlags(fs, srv, metricsListen, metricsDefault)
	addSecurityFlags(fs, sec, policyHelp)
}

func addServerFlags(fs *flag.FlagSet, cfg *server.Config, listen string) {
	fs.StringVar(&cfg.Listen, "listen", listen, "gRPC listen address")
	fs.BoolVar(&cfg.Reflection, "reflection", true, "serve gRPC reflection (for grpcurl)")
	fs.DurationVar(&cfg.DrainPeriod, "drain-period", server.DefaultDrainPeriod, "on SIGTERM, how long health reports NOT_SERVING while calls are still served, before the listener closes")
	fs.DurationVar(&cfg.GracePeriod, "shutdown-grace", server.DefaultGracePeriod, "after the drain period, how long in-flight calls may finish")
}

func addVaultFlags(fs *flag.FlagSet, cfg *app.VaultConfig, key string) {
	fs.StringVar(&cfg.Addr, "vault-addr", os.Getenv("VAULT_ADDR"), "Vault address (default $VAULT_ADDR)")
	fs.StringVar(&cfg.Token, "vault-token", "", "Vault token (prefer the environment: FLEETBROKER_VAULT_TOKEN or VAULT_TOKEN)")
	fs.StringVar(&cfg.Mount, "vault-transit-mount", app.DefaultVaultMount, "mount path of the transit engine")
	fs.StringVar(&cfg.Key, "vault-transit-key", key, "transit key name (derived=true)")
	fs.DurationVar(&cfg.Timeout, "vault-timeout", app.DefaultVaultTimeout, "timeout of each Vault call")
	fs.StringVar(&cfg.Namespace, "vault-namespace", os.Getenv("VAULT_NAMESPACE"), "Vault Enterprise namespace (default $VAULT_NAMESPACE)")
	fs.StringVar(&cfg.CACert, "vault-ca-cert", "", "CA bundle for TLS to Vault (default $VAULT_CACERT, else system roots)")
	fs.StringVar(&cfg.TLSServerName, "vault-tls-server-name", "", "name expected in Vault's certificate (default: the host of --vault-addr)")
	fs.StringVar(&cfg.Auth.Method, "vault-auth-method", transit.AuthToken, "how to log in to Vault: token, approle or kubernetes (renewed, and logged in again when renewal ends)")
	fs.StringVar(&cfg.Auth.RoleIDFile, "vault-approle-role-id-file", "", "approle: file holding the role_id")
	fs.StringVar(&cfg.Auth.SecretIDFile, "vault-approle-secret-id-file", "", "approle: file holding the secret_id (or a wrapping token for it)")
	fs.BoolVar(&cfg.Auth.SecretIDWrapped, "vault-approle-secret-id-wrapped", false, "approle: the secret_id file holds a response-wrapping token")
	fs.StringVar(&cfg.Auth.KubernetesRole, "vault-k8s-role", "", "kubernetes: the Vault role to log in as")
	fs.StringVar(&cfg.Auth.KubernetesTokenPath, "vault-k8s-token-path", "", "kubernetes: service-account token file (default "+transit.DefaultKubernetesTokenPath+")")
	fs.StringVar(&cfg.Auth.MountPath, "vault-auth-mount", "", "mount path of the auth method (default approle / kubernetes)")
}

// vaultTokenFallback applies VAULT_TOKEN when neither the flag nor
// FLEETBROKER_VAULT_TOKEN set a token; the token never appears in --help.
func vaultTokenFallback(cfg *app.VaultConfig) {
	if cfg.Auth.Method == transit.AuthToken {
		cfg.Auth.Method = "" // transit's default; keeps its check that no other method's settings are given
	}
	if cfg.Token == "" && cfg.Auth.Method == "" {
		cfg.Token = os.Getenv("VAULT_TOKEN")
	}
}

type redisFlags struct {
	addrs string
	cfg   app.RedisConfig
}

func addRedisFlags(fs *flag.FlagSet, prefix *string) *redisFlags {
	r := &redisFlags{}
	fs.StringVar(&r.addrs, "redis-addr", app.DefaultRedisAddr, "Redis address; several comma-separated addresses mean Cluster (or Sentinels with --redis-master-name)")
	fs.StringVar(&r.cfg.MasterName, "redis-master-name", "", "Sentinel master name (enables Sentinel)")
	fs.StringVar(&r.cfg.Username, "redis-username", "", "Redis ACL user name")
	fs.StringVar(&r.cfg.Password, "redis-password", "", "Redis password (prefer FLEETBROKER_REDIS_PASSWORD)")
	fs.DurationVar(&r.cfg.Timeout, "redis-timeout", app.DefaultRedisTimeout, "dial/read/write timeout of each Redis call")
	fs.StringVar(prefix, "redis-prefix", app.DefaultRedisPrefix, "prefix of every Redis key")
	fs.BoolVar(&r.cfg.TLS, "redis-tls", false, "connect to Redis over TLS 1.2+ (every Cluster node, or the Sentinels and the master)")
	fs.StringVar(&r.cfg.TLSCAFile, "redis-tls-ca", "", "PEM CA bundle that verifies Redis server certificates (default: system roots)")
	fs.StringVar(&r.cfg.TLSCertFile, "redis-tls-cert", "", "PEM client certificate for Redis servers that check clients")
	fs.StringVar(&r.cfg.TLSKeyFile, "redis-tls-key", "", "PEM key of --redis-tls-cert")
	fs.StringVar(&r.cfg.TLSServerName, "redis-tls-server-name", "", "name expected in Redis server certificates (default: the host dialled)")
	return r
}

func (r *redisFlags) config() app.RedisConfig {
	cfg := r.cfg
	for _, a := range strings.Split(r.addrs, ",") {
		if a = strings.TrimSpace(a); a != "" {
			cfg.Addrs = append(cfg.Addrs, a)
		}
	}
	return cfg
}

func addSecurityFlags(fs *flag.FlagSet, cfg *app.SecurityConfig, policyHelp string) {
	fs.StringVar(&cfg.TLSCert, "tls-cert", "", "server certificate (PEM); re-read when the file changes")
	fs.StringVar(&cfg.TLSKey, "tls-key", "", "server private key (PEM); re-read when the file changes")
	fs.StringVar(&cfg.TLSClientCA, "tls-client-ca", "", "CA bundle for client certificates: when set, clients must present one (mTLS)")
	fs.BoolVar(&cfg.ClientCertOptional, "tls-client-cert-optional", false, "with --tls-client-ca: let clients without a certificate connect (API-key callers, probes); calls without an identity are still refused")
	fs.BoolVar(&cfg.Insecure, "insecure", false, "serve plaintext (only behind a sidecar that terminates mTLS)")
	fs.StringVar(&cfg.PolicyFile, "policy", "", policyHelp)
	fs.StringVar(&cfg.AuditLog, "audit-log", app.DefaultAuditLog, "audit trail file: an intent record is synced before each call runs (the call is refused with UNAVAILABLE when it cannot be) and an outcome after; - for stderr (written, not synced)")
	fs.StringVar(&cfg.TrustedHeader, "trusted-header", "", "metadata carrying the caller's principal, set by a trusted proxy (with --insecure only); x-forwarded-client-cert is read as Envoy/Istio write it")
	fs.StringVar(&cfg.TrustedProxies, "trusted-proxies", "", "comma-separated CIDRs whose --trusted-header is believed")
	fs.BoolVar(&cfg.ClientCNPrincipals, "tls-client-cn-principals", false, "name a client certificate without URI or DNS SAN by its subject CN (principal cn:<CN>); off because any CA can put any text in a CN")
	fs.IntVar(&cfg.RateLimitPrincipal, "rate-limit-principal", 0, "requests per second per authenticated principal, across replicas (0: off; callers without an identity have no principal budget)")
	fs.IntVar(&cfg.RateLimitSession, "rate-limit-session", 0, "requests per second per session handle on handle-authorized calls (the gateway's), across replicas (0: off)")
	fs.IntVar(&cfg.RateLimitTenant, "rate-limit-tenant", 0, "requests per second per tenant, across replicas (0: off)")
}

func addDeadlineFlags(fs *flag.FlagSet, cfg *server.Config) {
	fs.DurationVar(&cfg.DefaultDeadline, "default-deadline", server.DefaultDeadline, "deadline of a unary call whose caller set none")
	fs.IntVar(&cfg.MaxRecvMsgSize, "max-recv-msg-size", server.DefaultMaxRecvMsgSize, "largest inbound message in bytes")
	fs.IntVar(&cfg.MaxConcurrentStreams, "max-concurrent-streams", server.DefaultMaxConcurrentStreams, "calls and streams one client connection may have open at once; more wait for a free one (negative: no bound)")
}

// addMeshFlags are the connection settings a mesh or L4 balancer needs.
func addMeshFlags(fs *flag.FlagSet, cfg *server.Config, metricsListen *string, metricsDefault string) {
	fs.StringVar(metricsListen, "metrics-listen", metricsDefault, "HTTP address serving Prometheus metrics at /metrics (empty: off)")
	fs.DurationVar(&cfg.MaxConnectionAge, "max-connection-age", server.DefaultMaxConnectionAge, "GOAWAY connections older than this, so clients rebalance across replicas (negative: never; streams are cut too)")
	fs.DurationVar(&cfg.MaxConnectionAgeGrace, "max-connection-age-grace", server.DefaultMaxConnectionAgeGrace, "time calls get to finish after that GOAWAY (negative: forever)")
	fs.DurationVar(&cfg.KeepaliveTime, "keepalive-time", server.DefaultKeepaliveTime, "ping a client idle this long")
	fs.DurationVar(&cfg.KeepaliveTimeout, "keepalive-timeout", server.DefaultKeepaliveTimeout, "close a connection whose ping is not answered within this")
	fs.DurationVar(&cfg.KeepaliveMinTime, "keepalive-min-time", server.DefaultKeepaliveMinTime, "shortest client ping interval accepted (also without open calls)")
	fs.DurationVar(&cfg.ReadinessInterval, "readiness-interval", server.DefaultReadinessInterval, "how often Redis (and Vault) reachability is checked for readiness")
	fs.DurationVar(&cfg.ReadinessTimeout, "readiness-timeout", server.DefaultReadinessTimeout, "bound of one readiness check")
}
