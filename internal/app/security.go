package app

import (
	"cmp"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
)

// SecurityConfig is how a service authenticates and limits its callers.
// The same flags serve every subcommand.
type SecurityConfig struct {
	// TLSCert and TLSKey serve TLS 1.3; TLSClientCA makes it mTLS.
	TLSCert, TLSKey, TLSClientCA string
	// ClientCertOptional lets clients without a certificate connect (API-key
	// callers, probes); calls without an identity are still refused.
	ClientCertOptional bool
	// Insecure allows plaintext (behind a sidecar that terminates mTLS).
	Insecure bool
	// PolicyFile grants principals actions on tenants (YAML or JSON).
	PolicyFile string
	// AuditLog is the audit trail file; "-" means stderr.
	AuditLog string
	// AuditLogger, if set, is the audit trail instead of AuditLog's, and
	// is not closed by the service: for benchmarks that measure what the
	// trail costs (audit.Discard()). No flag sets it.
	AuditLogger *audit.Logger
	// TrustedHeader carries a principal set by a proxy in TrustedProxies
	// (comma-separated CIDRs); only honoured with Insecure.
	TrustedHeader  string
	TrustedProxies string
	// ClientCNPrincipals lets a client certificate without SANs be named by
	// its subject CN ("cn:<CN>"). Off by default: any CA that signs server
	// certificates can put any text in a CN.
	ClientCNPrincipals bool
	// RateLimitPrincipal, RateLimitSession and RateLimitTenant are requests
	// per second (0: off). Principal budgets apply to authenticated callers
	// only; session budgets to calls authorized by a session handle.
	RateLimitPrincipal int
	RateLimitSession   int
	RateLimitTenant    int
}

// security is what SecurityConfig builds: the server settings and the
// authorizer handlers use. Close releases watchers and files.
type security struct {
	authorizer *authz.Authorizer
	limits     *authz.RateLimits
	audit      *audit.Logger
	closers    []io.Closer
}

func (s *security) Close() {
	for _, c := range s.closers {
		_ = c.Close()
	}
}

// buildSecurity loads TLS material, the policy and the audit log, and
// returns the security wiring plus cfg completed with TLS and interceptors.
// A nil policy source means the caller supplies one (dev: allow-all). rules
// are the methods the server serves; every other method is refused.
func buildSecurity(sec SecurityConfig, cfg server.Config, rules map[string]authz.Rule, handleKeys *handle.Keys, requirePrincipal bool, src policy.Source, rdb redis.UniversalClient, redisPrefix string, logger *slog.Logger) (*security, server.Config, error) {
	out := &security{}
	fail := func(err error) (*security, server.Config, error) {
		out.Close()
		return nil, cfg, err
	}
	if sec.TLSCert != "" || sec.TLSKey != "" {
		reloader, tlsCfg, err := tlsutil.NewServerConfig(tlsutil.Files{CertFile: sec.TLSCert, KeyFile: sec.TLSKey, CAFile: sec.TLSClientCA, ClientCertOptional: sec.ClientCertOptional}, logger)
		if err != nil {
			return fail(fmt.Errorf("--tls-cert/--tls-key/--tls-client-ca: %w", err))
		}
		out.closers = append(out.closers, reloader)
		cfg.TLS = tlsCfg
	} else if sec.TLSClientCA != "" {
		return fail(fmt.Errorf("--tls-client-ca needs --tls-cert and --tls-key"))
	}
	cfg.Insecure = sec.Insecure
	if src == nil {
		if sec.PolicyFile == "" {
			return fail(fmt.Errorf("--policy is required: it says which principal may do what for which tenant (see docs/security.md)"))
		}
		watcher, err := policy.Watch(sec.PolicyFile, logger)
		if err != nil {
			return fail(fmt.Errorf("--policy: %w", err))
		}
		out.closers = append(out.closers, watcher)
		src = watcher
	}
	auditLog := sec.AuditLogger
	if auditLog == nil {
		var err error
		if auditLog, err = openAudit(sec.AuditLog, logger); err != nil {
			return fail(err)
		}
		out.closers = append(out.closers, auditLog)
	}
	out.audit = auditLog
	proxies, err := parsePrefixes(sec.TrustedProxies)
	if err != nil {
		return fail(fmt.Errorf("--trusted-proxies: %w", err))
	}
	if sec.TrustedHeader != "" && !sec.Insecure {
		return fail(fmt.Errorf("--trusted-header is only for --insecure behind a mesh sidecar"))
	}
	out.limits = &authz.RateLimits{
		Limiter:      ratelimit.New(rdb, cmp.Or(redisPrefix, "fb")+":api:rl"),
		PerPrincipal: perSecond(sec.RateLimitPrincipal),
		PerSession:   perSecond(sec.RateLimitSession),
		PerTenant:    perSecond(sec.RateLimitTenant),
	}
	out.authorizer = authz.New(authz.Config{
		Policy: src, Audit: auditLog, Logger: logger, Methods: rules, HandleKeys: handleKeys, Limits: out.limits,
		RequirePrincipal: requirePrincipal, TrustedHeader: sec.TrustedHeader, TrustedProxies: proxies,
		Cert: authn.CertOptions{AllowCN: sec.ClientCNPrincipals},
	})
	cfg.Unary = append(cfg.Unary, out.authorizer.UnaryServerInterceptor())
	cfg.Stream = append(cfg.Stream, out.authorizer.StreamServerInterceptor())
	return out, cfg, nil
}

// checkRules logs every method srv serves that has no authorization rule:
// the authorizer refuses them to everyone, which is safe but surely not
// what their author meant. test/security fails on them.
func (s *security) checkRules(srv *server.Server, logger *slog.Logger) {
	for _, m := range s.authorizer.Unlisted(srv.GRPC().GetServiceInfo()) {
		logger.Error("method has no authorization rule and is refused to every caller; add it to its service's policy actions or session methods", "method", m)
	}
}

func perSecond(n int) ratelimit.Limit {
	if n <= 0 {
		return ratelimit.Limit{}
	}
	return ratelimit.PerSecond(n, n)
}

// openAudit opens the audit trail. A file is synced before each call runs
// (fail closed on any error); stderr is only written, and is as durable as
// whatever collects it, so a warning says so.
func openAudit(path string, logger *slog.Logger) (*audit.Logger, error) {
	switch path {
	case "", "-":
		logger.Warn("audit trail on stderr (--audit-log=-): records are written before each call runs, but not synced; a crash can lose the last ones. Use a file on a persistent volume where the trail must be durable")
		return audit.New(os.Stderr), nil
	}
	l, err := audit.Open(path)
	if err != nil {
		return nil, fmt.Errorf("--audit-log: %w", err)
	}
	return l, nil
}

func parsePrefixes(list string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range strings.Split(list, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
