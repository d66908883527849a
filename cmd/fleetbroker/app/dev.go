package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/httpserve"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// DevConfig configures `fleetbroker dev`.
type DevConfig struct {
	// Listen serves every gRPC service (default localhost:7400).
	Listen string
	// SimulatorListen serves the Wialon/FleetUp simulator (default localhost:7480).
	SimulatorListen  string
	AllowedUpstreams string
	Reflection       bool
	MaxSessionTTL    time.Duration
	// MetricsListen serves Prometheus metrics ("" to turn off).
	MetricsListen string
	// FleetUpRate is FleetUp requests per second per account (the
	// simulator does not need FleetUp's 1/s guidance; default 50).
	FleetUpRate int
	// ListenAnywhere lets Listen and MetricsListen bind addresses other
	// than loopback. Dev lets every caller do everything, so by default it
	// refuses to be reachable from other machines.
	ListenAnywhere bool
	// AuthorizeListen serves the Wialon authorization callback (default
	// localhost:7403 on the command line; empty: off); AuthorizeReturnURLs
	// are return URLs allowed besides dev's own page.
	AuthorizeListen     string
	AuthorizeReturnURLs string
}

// Defaults of `fleetbroker dev`.
const (
	DefaultDevListen          = "localhost:7400"
	DefaultDevSimulatorListen = "localhost:7480"
	DefaultDevMetricsListen   = "localhost:7490"
	DefaultDevAuthorizeListen = "localhost:7403"
	DefaultDevFleetUpRate     = 50
)

// SetDefaults fills the listeners every dev needs and the FleetUp rate;
// an empty MetricsListen or AuthorizeListen stays off.
func (cfg *DevConfig) SetDefaults() {
	if cfg.Listen == "" {
		cfg.Listen = DefaultDevListen
	}
	if cfg.SimulatorListen == "" {
		cfg.SimulatorListen = DefaultDevSimulatorListen
	}
	if cfg.FleetUpRate <= 0 {
		cfg.FleetUpRate = DefaultDevFleetUpRate
	}
}

// Validate reports every problem at once, before anything listens: dev has
// no caller authentication, so its ports stay on loopback unless
// ListenAnywhere says otherwise.
func (cfg DevConfig) Validate() error {
	var p problems
	if !cfg.ListenAnywhere {
		p.add(checkLoopbackAddr("--listen", cfg.Listen))
		if cfg.MetricsListen != "" {
			p.add(checkLoopbackAddr("--metrics-listen", cfg.MetricsListen))
		}
		if cfg.AuthorizeListen != "" {
			p.add(checkLoopbackAddr("--authorize-listen", cfg.AuthorizeListen))
		}
	}
	if _, err := upstream.ParseAllowList(cfg.AllowedUpstreams); err != nil {
		p.add(fmt.Errorf("--allowed-upstreams: %w", err))
	}
	if _, err := credentials.ParseReturnURLs(cfg.AuthorizeReturnURLs); err != nil {
		p.add(fmt.Errorf("--authorize-return-urls: %w", err))
	}
	return p.err()
}

// Demo tenant and credential ids seeded by `fleetbroker dev`.
const (
	DemoTenant            = "demo"
	DemoWialonCredential  = "wialon-demo"
	DemoFleetUpCredential = "fleetup-demo"
)

const devBanner = `
==========================================================================
 fleetbroker dev: DEVELOPMENT MODE. NOT FOR PRODUCTION.
 Secrets are encrypted by an in-memory dev keyring (not Vault), stored in an
 in-process Redis that forgets everything on exit, and served over plaintext
 gRPC with no caller authentication.
==========================================================================`

// devParts are what dev hands the production builders instead of what
// production dials and reads: an in-process Redis-protocol server (so the
// real go-redis code runs), the dev keyring in place of Vault, handle keys
// made at start, and a policy that lets everyone do everything.
type devParts struct {
	deps    Deps
	closers closeStack
}

func newDevParts(ctx context.Context, logger *slog.Logger) (*devParts, error) {
	p := &devParts{}
	fail := func(err error) (*devParts, error) { p.closers.closeAll(); return nil, err }
	mini, err := miniredis.Run()
	if err != nil {
		return fail(fmt.Errorf("start in-process redis: %w", err))
	}
	p.closers.push(mini.Close)
	// The production client: every call bounded, no client retries.
	rdb, err := NewRedis(ctx, RedisConfig{Addrs: []string{mini.Addr()}})
	if err != nil {
		return fail(fmt.Errorf("in-process redis: %w", err))
	}
	p.closers.push(func() { rdb.Close() })
	metrics := telemetry.NewMetrics()
	if err := instrumentRedis(rdb, metrics); err != nil {
		return fail(err)
	}
	keyring, err := transit.NewKeyring()
	if err != nil {
		return fail(fmt.Errorf("dev keyring: %w", err))
	}
	// Handle keys live as long as the process, like every handle it issues.
	handleKeys, err := handle.GenerateKeys()
	if err != nil {
		return fail(fmt.Errorf("dev handle keys: %w", err))
	}
	// Nothing in a fresh in-process Redis predates keyed handles: legacy
	// ones are refused from the start, by both services.
	if _, err := handle.NewLegacyWindow(rdb, DefaultRedisPrefix).Close(ctx, 0); err != nil {
		return fail(fmt.Errorf("in-process redis: %w", err))
	}
	p.deps = Deps{Logger: logger, Metrics: metrics, Transit: keyring, Redis: rdb, HandleKeys: handleKeys, Policy: policy.Static(policy.AllowAll())}
	return p, nil
}

// services are the configurations dev builds the two services with: the
// production ones with dev's settings, the simulator (at simAddrs) always
// allowed, no TLS and an audit trail on stderr.
func (cfg DevConfig) services(simAddrs, authURL string) (CredentialsConfig, GatewayConfig) {
	allowed := joinList(cfg.AllowedUpstreams, simAddrs)
	sec := SecurityConfig{Insecure: true, AuditLog: "-"}
	cred := CredentialsConfig{
		Server:           server.Config{Listen: cfg.Listen, Reflection: cfg.Reflection},
		Security:         sec,
		AllowedUpstreams: allowed,
		MaxSessionTTL:    cfg.MaxSessionTTL,
	}
	if authURL != "" {
		cred.Authorize = AuthorizeConfig{PublicURL: authURL, ReturnURLs: joinList(cfg.AuthorizeReturnURLs, authURL+devReturnPath)}
	}
	gw := GatewayConfig{
		Security:         sec,
		AllowedUpstreams: allowed,
		HandleCacheTTL:   gateway.DefaultHandleCacheTTL,
		FleetUpRate:      cfg.FleetUpRate,
		FleetUpBurst:     cfg.FleetUpRate,
	}
	return cred, gw
}

// buildDev builds both services on one gRPC server with the production
// builders: the gateway reaches the credentials service over gRPC on that
// same port (d.CredentialsConn), exactly as it does when the two run apart.
func buildDev(ctx context.Context, cred CredentialsConfig, gw GatewayConfig, d Deps) (*Built, error) {
	cred.SetDefaults()
	gw.SetDefaults()
	if err := errors.Join(cred.validate(d), gw.validate(d)); err != nil {
		return nil, err
	}
	// Dev runs without TLS and lets every caller do everything, as its
	// banner says; the audit trail still runs, to stderr. Vault and Redis
	// are d's: the dev keyring and the in-process Redis.
	return buildServer(ctx, d, serverPlan{
		security:         cred.Security,
		rules:            authz.Rules(credentials.Actions, gateway.SessionMethods),
		prefix:           cred.RedisPrefix,
		settings:         cred.Server,
		authorizeHandler: devAuthorizeHandler,
		components: func(b *builder) ([]component, error) {
			c, err := b.credentials(ctx, cred)
			if err != nil {
				return nil, err
			}
			g, err := b.gateway(gw)
			return []component{c, g}, err
		},
	})
}

// RunDev runs every service in one process on embedded defaults: the
// production builders given dev's parts (devParts), the simulator, and the
// gRPC services on one port. The walkthrough is printed to out.
func RunDev(ctx context.Context, cfg DevConfig, out io.Writer, logger *slog.Logger) error {
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return err
	}
	logger.Warn("fleetbroker dev: development mode, not for production: dev keyring instead of Vault, in-memory Redis, no TLS, no caller authentication")
	if cfg.ListenAnywhere {
		logger.Warn("fleetbroker dev: --dev-listen-anywhere: every machine that reaches these ports may read and write every credential")
	}
	fmt.Fprintln(out, devBanner)

	parts, err := newDevParts(ctx, logger)
	if err != nil {
		return err
	}
	defer parts.closers.closeAll()
	lis, err := listenAll(cfg)
	if err != nil {
		return err
	}
	defer lis.closeAll()
	simAddr := displayAddr(cfg.SimulatorListen, lis.sim) // keep the name the user gave (localhost:7480)
	simURL := "http://" + simAddr
	var authURL string
	if lis.authorize != nil {
		authURL = devAuthorizePublicURL(cfg.AuthorizeListen, lis.authorize)
		parts.deps.AuthorizeListener = lis.authorize
	}
	selfConn, err := grpc.NewClient(lis.grpc.Addr().String(),
		append(parts.deps.Metrics.ClientDialOptions(), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		return err
	}
	defer selfConn.Close()
	parts.deps.CredentialsConn = selfConn
	credCfg, gwCfg := cfg.services(simAddr+","+lis.sim.Addr().String(), authURL)
	built, err := buildDev(ctx, credCfg, gwCfg, parts.deps)
	if err != nil {
		return err
	}
	defer built.Close()
	sim := simulator.New(simulator.Config{Demo: true})
	simServer := &http.Server{Handler: sim.Handler(), ReadHeaderTimeout: 5 * time.Second}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return httpserve.Serve(gctx, simServer, lis.sim) })
	g.Go(func() error { return built.GRPC.ServeListener(gctx, lis.grpc) })
	g.Go(func() error { return built.ServeBeside(gctx) })
	if cfg.MetricsListen != "" {
		g.Go(func() error { return telemetry.Serve(gctx, cfg.MetricsListen, parts.deps.Metrics.Handler(), logger) })
	}
	g.Go(func() error {
		if err := seedDemo(gctx, lis.grpc.Addr().String(), simURL); err != nil {
			return fmt.Errorf("seed demo tenant: %w", err)
		}
		// One write, so whoever waits for "is ready" reads all of it.
		var walkthrough strings.Builder
		printWalkthrough(&walkthrough, displayAddr(cfg.Listen, lis.grpc), simURL)
		if authURL != "" {
			printConnectWalkthrough(&walkthrough, displayAddr(cfg.Listen, lis.grpc), simURL, authURL)
		}
		fmt.Fprint(out, walkthrough.String())
		return nil
	})
	return g.Wait()
}

// devListeners are dev's ports, bound before anything is built so the
// printed addresses are the bound ones.
type devListeners struct {
	sim, grpc, authorize net.Listener
}

func listenAll(cfg DevConfig) (*devListeners, error) {
	l := &devListeners{}
	var err error
	if l.sim, err = net.Listen("tcp", cfg.SimulatorListen); err != nil {
		return nil, fmt.Errorf("simulator: listen on %s: %w", cfg.SimulatorListen, err)
	}
	if l.grpc, err = listenDev("--listen", cfg.Listen, cfg.ListenAnywhere); err != nil {
		l.closeAll()
		return nil, err
	}
	if cfg.AuthorizeListen != "" {
		if l.authorize, err = listenDev("--authorize-listen", cfg.AuthorizeListen, cfg.ListenAnywhere); err != nil {
			l.closeAll()
			return nil, err
		}
	}
	return l, nil
}

// closeAll closes the listeners; those already served are closed again,
// harmlessly.
func (l *devListeners) closeAll() {
	for _, lis := range []net.Listener{l.sim, l.grpc, l.authorize} {
		if lis != nil {
			_ = lis.Close()
		}
	}
}

// listenDev listens on addr, and unless anywhere is set refuses any bound
// address that is not loopback: dev serves every RPC to every caller.
func listenDev(flagName, addr string, anywhere bool) (net.Listener, error) {
	if !anywhere {
		if err := checkLoopbackAddr(flagName, addr); err != nil {
			return nil, err
		}
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s: %w", flagName, addr, err)
	}
	if !anywhere {
		if ip := lis.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
			lis.Close()
			return nil, errNotLoopback(flagName, addr)
		}
	}
	return lis, nil
}

// checkLoopbackAddr accepts host:port addresses whose host is "localhost"
// or a loopback IP; an empty host (every interface) and other names are
// refused, since dev has no caller authentication.
func checkLoopbackAddr(flagName, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s %q: %w", flagName, addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return errNotLoopback(flagName, addr)
}

func errNotLoopback(flagName, addr string) error {
	return fmt.Errorf("%s %s is not a loopback address: fleetbroker dev lets every caller do everything, without authentication; "+
		"listen on localhost, or pass --dev-listen-anywhere if every machine that can reach it may read and write every credential", flagName, addr)
}

// seedDemo stores the simulator's demo credentials through the public API,
// so they are validated and encrypted exactly like a customer's.
func seedDemo(ctx context.Context, grpcAddr, simURL string) error {
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := credentialsv1.NewCredentialServiceClient(conn)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	puts := []*credentialsv1.PutCredentialRequest{
		{TenantId: DemoTenant, CredentialId: DemoWialonCredential, Labels: map[string]string{"source": "simulator"},
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: simulator.DemoWialonToken, BaseUrl: simURL}}},
		{TenantId: DemoTenant, CredentialId: DemoFleetUpCredential, Labels: map[string]string{"source": "simulator"},
			Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
				ApiKey: simulator.DemoFleetUpAPIKey, AccountId: simulator.DemoFleetUpAccountID, Secret: simulator.DemoFleetUpSecret, BaseUrl: simURL}}},
	}
	for _, req := range puts {
		if _, err := client.PutCredential(ctx, req, grpc.WaitForReady(true)); err != nil {
			return fmt.Errorf("put %s: %w", req.GetCredentialId(), err)
		}
	}
	return nil
}

func printWalkthrough(out io.Writer, grpcAddr, simURL string) {
	fmt.Fprintf(out, `
fleetbroker dev is ready.
  gRPC (credentials, sessions, telematics):  %[1]s
  simulator (Wialon + FleetUp):              %[2]s   (login/mint counters: %[2]s/sim/stats)
  demo tenant %[3]q with credentials %[4]q and %[5]q

Try (grpcurl: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3):
  grpcurl -plaintext %[1]s list
  grpcurl -plaintext -d '{"tenant_id":"%[3]s"}' %[1]s fleetbroker.credentials.v1.CredentialService/ListCredentials

  # a 10-minute session handle for the Wialon demo credential (use %[5]q for FleetUp)
  HANDLE=$(grpcurl -plaintext -d '{"tenant_id":"%[3]s","credential_id":"%[4]s","ttl":"600s"}' %[1]s fleetbroker.credentials.v1.SessionService/IssueSession | grep -o 'fbs_[A-Za-z0-9]*')

  grpcurl -plaintext -H "authorization: Bearer $HANDLE" -d '{"page_size":5}' %[1]s fleetbroker.telematics.v1.TelematicsService/ListUnits
  grpcurl -plaintext -H "authorization: Bearer $HANDLE" %[1]s fleetbroker.telematics.v1.TelematicsService/GetLatestPositions
  grpcurl -plaintext -H "authorization: Bearer $HANDLE" -d '{"min_interval":"2s"}' %[1]s fleetbroker.telematics.v1.TelematicsService/WatchPositions
  grpcurl -plaintext -d "{\"handle\":\"$HANDLE\"}" %[1]s fleetbroker.credentials.v1.SessionService/RevokeSession
`, grpcAddr, simURL, DemoTenant, DemoWialonCredential, DemoFleetUpCredential)
}

func joinList(list, extra string) string {
	if strings.TrimSpace(list) == "" {
		return extra
	}
	return list + "," + extra
}

// displayAddr is the address to print for a listener: the configured one if
// it names a host, else the bound one.
func displayAddr(configured string, lis net.Listener) string {
	if host, port, _ := net.SplitHostPort(configured); host != "" && port != "0" {
		return configured
	}
	return lis.Addr().String()
}
