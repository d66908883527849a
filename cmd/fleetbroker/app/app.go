// Package app is fleetbroker's composition root: it builds each
// subcommand's server from the service packages, and nothing else does.
//
// Every subcommand follows one path, in the order a reader meets it:
//
//  1. Config: one struct per subcommand (CredentialsConfig, GatewayConfig,
//     DevConfig, MaintenanceConfig) holding only settings — what flags and
//     FLEETBROKER_* variables give. SetDefaults fills what was left empty
//     with the Default… constants (defaults.go), and Validate reports every
//     problem at once, before any file is read or anything is dialled.
//  2. Deps: the parts a builder is handed instead of making them — the
//     transit, the Redis client, the handle keys, the policy, the audit
//     trail, the provider transport, the credentials connection. A nil part
//     is made from the config: files are read, then Vault and Redis are
//     dialled. Production hands in only a logger and metrics; `fleetbroker
//     dev` hands in the dev keyring, an in-process Redis and handle keys made
//     at start, and is otherwise built by the same code; tests hand in
//     prepared parts.
//  3. Build: BuildCredentials and BuildGateway assemble the parts in a
//     visible order, wrapping every error with what failed, and return a
//     Built, which serves through the one server bootstrap (internal/server).
//
// cmd/fleetbroker only parses flags and calls in here.
package app

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Deps are the parts of a service its builder is given rather than makes
// from its configuration. Each nil field is made from the config; a part
// given here is used as it is and never closed by the builder.
type Deps struct {
	// Logger receives the service's logs (nil: discarded).
	Logger *slog.Logger
	// Metrics records the service's metrics (nil: not measured).
	Metrics *telemetry.Metrics
	// Transit is the service's transit key: the credentials service seals
	// secrets with it, the gateway wraps its data keys (nil: Vault, dialled
	// with the config's Vault settings). BuildCredentials batches
	// concurrent calls to a Vault or Keyring (TransitBatch);
	// NewCredentialsService uses it as it is.
	Transit transit.Transit
	// Redis holds the records, locks and budgets (nil: dialled with the
	// config's Redis settings).
	Redis redis.UniversalClient
	// HandleKeys sign and check session handles (nil: read from
	// HandleKeyFile).
	HandleKeys *handle.Keys
	// Policy grants principals actions on tenants (nil: the --policy file,
	// watched; the gateway, which needs none, uses an empty one without it).
	Policy policy.Source
	// Audit is the audit trail (nil: --audit-log opened).
	Audit *audit.Logger
	// Providers are the providers served (nil: every one, providers.All).
	Providers []provider.Factory
	// UpstreamTransport carries every provider call (nil: the allow-list
	// guarded upstream.NewTransport). It is wrapped with metrics either way.
	UpstreamTransport http.RoundTripper

	// Store keeps the credentials service's records (nil: Redis, under
	// RedisPrefix). A store other than Redis turns the login budgets,
	// events and the connect flow off.
	Store store.Store
	// AuthorizeListener serves the Wialon authorization callback instead of
	// listening on Authorize.Listen (dev and tests, which must know the
	// port before building).
	AuthorizeListener net.Listener
	// CredentialsConn reaches the credentials service for the gateway (nil:
	// dialled at CredentialsAddr with the CredentialsTLS settings).
	CredentialsConn *grpc.ClientConn
	// BesideRegister registers more services on the credentials service's
	// gRPC server, behind the same interceptors, and BesideActions maps
	// their methods to the policy action a caller needs: the benchmark's
	// no-op reference (cmd/fleetbroker-bench). No flag sets them.
	BesideRegister func(*grpc.Server)
	BesideActions  map[string]policy.Action
}

func (d Deps) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Logger
}

// Built is a service built and ready to serve: its gRPC server, what runs
// beside the gRPC port, and what to release afterwards.
type Built struct {
	// GRPC is the gRPC server.
	GRPC *server.Server
	// beside runs while the server serves: background work, the
	// authorization callback.
	beside  []func(context.Context) error
	closers closeStack
}

// ServeBeside runs everything but the gRPC port until ctx ends.
func (b *Built) ServeBeside(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, f := range b.beside {
		g.Go(func() error { return f(ctx) })
	}
	return g.Wait()
}

// Close releases what the build opened, last opened first.
func (b *Built) Close() { b.closers.closeAll() }

// closeStack releases what a build opened, last opened first.
type closeStack []func()

func (c *closeStack) push(f func()) { *c = append(*c, f) }

func (c *closeStack) pushCloser(cl io.Closer) { c.push(func() { _ = cl.Close() }) }

func (c *closeStack) closeAll() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
	*c = nil
}
