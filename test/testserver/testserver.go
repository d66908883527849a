// Package testserver runs fleetbroker in process for tests: the credentials
// service and gateway replicas on real Redis and a real Vault (from
// internal/testenv), in front of the simulator, each served by the
// production server bootstrap (internal/server) on a bufconn listener. It is
// the one in-process stack; packages do not build their own.
package testserver

import (
	"context"
	"log/slog"
	"net"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// Options shape a Stack. The zero value is one gateway replica.
type Options struct {
	Replicas int
	// HandleCacheTTL is the gateway's handle resolution cache (0: none, so
	// revocation shows at once).
	HandleCacheTTL time.Duration
	// FleetUpRate is FleetUp requests per second per account (default
	// 1000, so tests that are not about the budget do not wait for it).
	FleetUpRate int
	// Logger receives every service's logs (default: discarded).
	Logger *slog.Logger
}

// Stack is a credentials service and gateway replicas sharing one real
// Redis and one real Vault, in front of one simulator.
type Stack struct {
	Sim *simulator.Simulator
	// SimURL is the simulator's base URL, the base_url of test credentials.
	SimURL string
	// SimClock shifts the simulator's clock (ns), to expire upstream tokens.
	SimClock *atomic.Int64
	// CredConn reaches the credentials service (CredentialService and
	// SessionService); GatewayConns reach the gateway replicas.
	CredConn     *grpc.ClientConn
	GatewayConns []*grpc.ClientConn
	Redis        redis.UniversalClient
	RedisPrefix  string

	gatewayDials []func(...grpc.DialOption) *grpc.ClientConn
}

// DialGateway opens a new connection to replica i with extra dial options
// (a client.HandleSource's, say); it is closed when the test ends.
func (s *Stack) DialGateway(i int, opts ...grpc.DialOption) *grpc.ClientConn {
	return s.gatewayDials[i](opts...)
}

// Credentials returns a CredentialService client.
func (s *Stack) Credentials() credentialsv1.CredentialServiceClient {
	return credentialsv1.NewCredentialServiceClient(s.CredConn)
}

// Sessions returns a SessionService client.
func (s *Stack) Sessions() credentialsv1.SessionServiceClient {
	return credentialsv1.NewSessionServiceClient(s.CredConn)
}

// Gateway returns a client of replica i.
func (s *Stack) Gateway(i int) telematicsv1.TelematicsServiceClient {
	return telematicsv1.NewTelematicsServiceClient(s.GatewayConns[i])
}

// New starts a Stack that is stopped when t ends.
func New(t testing.TB, opts Options) *Stack {
	t.Helper()
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	if opts.FleetUpRate <= 0 {
		opts.FleetUpRate = 1000
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	st := &Stack{SimClock: &atomic.Int64{}}
	st.Sim = simulator.New(simulator.Config{Now: func() time.Time { return time.Now().Add(time.Duration(st.SimClock.Load())) }})
	simServer := httptest.NewServer(st.Sim.Handler())
	t.Cleanup(simServer.Close)
	st.SimURL = simServer.URL
	allowed := strings.TrimPrefix(simServer.URL, "http://")

	rs := testenv.Redis(t)
	st.Redis = rs.Client(t)
	st.RedisPrefix = testenv.RedisPrefix(t)
	vs := testenv.Vault(t)
	credTransit := Vault(t, vs, vs.NewKeyName(t))
	gwKey := vs.NewKeyName(t) // the gateway's data keys live under their own transit key

	keys, err := handle.GenerateKeys() // --handle-key-file, shared by both services
	if err != nil {
		t.Fatal(err)
	}
	credSvc, err := app.NewCredentialsService(app.CredentialsConfig{AllowedUpstreams: allowed, UpstreamTimeout: 5 * time.Second},
		app.Deps{Logger: logger, Store: store.NewRedis(st.Redis, store.RedisOptions{Prefix: st.RedisPrefix}), Transit: credTransit, HandleKeys: keys})
	if err != nil {
		t.Fatal(err)
	}
	st.CredConn = Serve(t, logger, credSvc.Register)
	for range opts.Replicas {
		gw, err := app.NewGatewayService(app.GatewayConfig{
			RedisPrefix:      st.RedisPrefix,
			AllowedUpstreams: allowed,
			HandleCacheTTL:   opts.HandleCacheTTL,
			FleetUpRate:      opts.FleetUpRate,
			FleetUpBurst:     1,
			UpstreamTimeout:  5 * time.Second,
		}, app.Deps{Logger: logger, CredentialsConn: st.CredConn, Redis: rs.Client(t), Transit: Vault(t, vs, gwKey), HandleKeys: keys})
		if err != nil {
			t.Fatal(err)
		}
		conn, dial := ServeDial(t, logger, gw.Register)
		st.GatewayConns = append(st.GatewayConns, conn)
		st.gatewayDials = append(st.gatewayDials, dial)
	}
	return st
}

// Vault returns a transit client on key of vs, creating the key.
func Vault(t testing.TB, vs testenv.VaultServer, key string) *transit.Vault {
	t.Helper()
	v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if err := v.EnsureKey(context.Background()); err != nil {
		t.Fatal(err)
	}
	return v
}

// Serve runs services with the production server bootstrap (plaintext) on
// a bufconn listener and returns a client connection to it: the one
// in-process server helper of every package's tests.
func Serve(t testing.TB, logger *slog.Logger, register ...func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	conn, _ := ServeDial(t, logger, register...)
	return conn
}

// ServeDial is Serve that also returns a dial function, for tests that make
// connections of their own (with other dial options) to the same server.
func ServeDial(t testing.TB, logger *slog.Logger, register ...func(*grpc.Server)) (*grpc.ClientConn, func(opts ...grpc.DialOption) *grpc.ClientConn) {
	t.Helper()
	return ServeConfig(t, server.Config{Logger: logger}, register...)
}

// ServeConfig is ServeDial on the server settings cfg (reflection, say),
// always plaintext: the bufconn listener has no TLS to terminate.
func ServeConfig(t testing.TB, cfg server.Config, register ...func(*grpc.Server)) (*grpc.ClientConn, func(opts ...grpc.DialOption) *grpc.ClientConn) {
	t.Helper()
	cfg.Insecure = true
	srv, err := server.New(cfg, register...)
	if err != nil {
		t.Fatal(err)
	}
	lis := bufconn.Listen(1 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.ServeListener(ctx, lis); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	dial := func(opts ...grpc.DialOption) *grpc.ClientConn {
		t.Helper()
		all := append([]grpc.DialOption{
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
		}, opts...)
		conn, err := grpc.NewClient("passthrough:///bufconn", all...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	return dial(), dial
}
