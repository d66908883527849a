package app

import (
	"crypto/tls"
	"fmt"
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

// security is what a SecurityConfig builds for one server: its TLS, the
// policy and audit trail, and the authorizer whose interceptors every call
// passes.
type security struct {
	cfg        SecurityConfig
	tls        *tls.Config // nil: plaintext (--insecure)
	policy     policy.Source
	audit      *audit.Logger
	authorizer *authz.Authorizer
	limits     *authz.RateLimits
}

// loadSecurity reads the files sec names — the TLS material and the policy,
// both watched from then on, and the audit trail — unless d holds the
// policy or the trail. Without a policy file, the policy is empty when
// policyRequired is false (the gateway's callers are authorized by their
// handle). Closers are pushed onto closers.
func loadSecurity(sec SecurityConfig, d Deps, policyRequired bool, closers *closeStack) (*security, error) {
	logger := d.logger()
	s := &security{cfg: sec, policy: d.Policy, audit: d.Audit}
	if sec.TLSCert != "" || sec.TLSKey != "" {
		reloader, tlsCfg, err := tlsutil.NewServerConfig(tlsutil.Files{CertFile: sec.TLSCert, KeyFile: sec.TLSKey, CAFile: sec.TLSClientCA, ClientCertOptional: sec.ClientCertOptional}, logger)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key/--tls-client-ca: %w", err)
		}
		closers.pushCloser(reloader)
		s.tls = tlsCfg
	}
	if s.policy == nil {
		switch {
		case sec.PolicyFile != "":
			watcher, err := policy.Watch(sec.PolicyFile, logger)
			if err != nil {
				return nil, fmt.Errorf("--policy: %w", err)
			}
			closers.pushCloser(watcher)
			s.policy = watcher
		case policyRequired:
			return nil, errPolicyRequired
		default:
			s.policy = policy.Static(&policy.Policy{})
		}
	}
	if s.audit == nil {
		trail, err := openAudit(sec.AuditLog, logger)
		if err != nil {
			return nil, err
		}
		closers.pushCloser(trail)
		s.audit = trail
	}
	return s, nil
}

// authorize makes the authorizer of a server that serves rules (every
// other method is refused), with caller budgets in rdb under prefix.
// handleKeys check the handles of session-authorized methods.
func (s *security) authorize(rules map[string]authz.Rule, handleKeys *handle.Keys, requirePrincipal bool, rdb redis.UniversalClient, prefix string, logger *slog.Logger) error {
	proxies, err := parsePrefixes(s.cfg.TrustedProxies)
	if err != nil {
		return fmt.Errorf("--trusted-proxies: %w", err)
	}
	s.limits = &authz.RateLimits{
		Limiter:      ratelimit.New(rdb, prefix+":api:rl"),
		PerPrincipal: perSecond(s.cfg.RateLimitPrincipal),
		PerSession:   perSecond(s.cfg.RateLimitSession),
		PerTenant:    perSecond(s.cfg.RateLimitTenant),
	}
	s.authorizer = authz.New(authz.Config{
		Policy: s.policy, Audit: s.audit, Logger: logger, Methods: rules, HandleKeys: handleKeys, Limits: s.limits,
		RequirePrincipal: requirePrincipal, TrustedHeader: s.cfg.TrustedHeader, TrustedProxies: proxies,
		Cert: authn.CertOptions{AllowCN: s.cfg.ClientCNPrincipals},
	})
	return nil
}

// serverConfig completes cfg with the TLS and the authorizer's interceptors.
func (s *security) serverConfig(cfg server.Config) server.Config {
	cfg.TLS, cfg.Insecure = s.tls, s.cfg.Insecure
	cfg.Unary = append(cfg.Unary, s.authorizer.UnaryServerInterceptor())
	cfg.Stream = append(cfg.Stream, s.authorizer.StreamServerInterceptor())
	return cfg
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
	l, err := audit.Open(path, audit.WithErrorLog(logger))
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
