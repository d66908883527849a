package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

// credentialsFlags declares the flags of `fleetbroker credentials`; the
// returned function finishes the config after parsing.
func credentialsFlags() (*flag.FlagSet, *app.CredentialsConfig, *logFlags, func()) {
	fs := flag.NewFlagSet("credentials", flag.ContinueOnError)
	cfg := &app.CredentialsConfig{}
	addServingFlags(fs, &cfg.Server, &cfg.Security, &cfg.MetricsListen, app.DefaultCredentialsListen, app.DefaultCredentialsMetricsListen,
		"policy file (YAML or JSON) granting principals actions on tenants; required; reloaded on change")
	addVaultFlags(fs, &cfg.Vault, app.DefaultCredentialsTransitKey)
	redis := addRedisFlags(fs, &cfg.RedisPrefix)
	fs.StringVar(&cfg.AllowedUpstreams, "allowed-upstreams", "", "comma-separated host[:port] a credential's base_url may name (provider defaults are always allowed)")
	fs.DurationVar(&cfg.MaxSessionTTL, "max-session-ttl", credentials.DefaultMaxSessionTTL, "maximum session handle lifetime")
	fs.DurationVar(&cfg.UpstreamTimeout, "upstream-timeout", app.DefaultUpstreamTimeout, "timeout of each provider validation or login call")
	fs.BoolVar(&cfg.LegacyResolveSecret, "legacy-resolve-secret", false, "keep the retired ResolveSecret answering during a rolling upgrade from older gateways (hands them long-lived secrets; turn off after)")
	addHandleKeyFlag(fs, &cfg.HandleKeyFile)
	addRedisWaitFlag(fs, &cfg.RedisWaitReplicas)
	fs.BoolVar(&cfg.WriteLegacyFormats, "write-legacy-formats", false, "issue CRC32 session handles and seal secrets with version 1 associated data, which the previous release reads: only while upgrading from it (see docs/operations.md)")
	addWialonLoginFlags(fs, cfg)
	legacyAD := fs.Bool("legacy-associated-data", true, "open secrets sealed with version 1 associated data (tenant + credential only); set false once `fleetbroker migrate` has re-sealed them all")
	addAuthorizeFlags(fs, &cfg.Authorize, &cfg.Events)
	addTransitBatchFlags(fs, &cfg.TransitBatch)
	logf := addLogFlags(fs, "json")
	return fs, cfg, logf, func() {
		vaultTokenFallback(&cfg.Vault)
		cfg.Redis = redis.config()
		cfg.RefuseLegacyAssociatedData = !*legacyAD
	}
}

// addWialonLoginFlags adds the flags of Wialon logins and keep-alives,
// which happen in the credentials service (docs/operations.md).
func addWialonLoginFlags(fs *flag.FlagSet, cfg *app.CredentialsConfig) {
	fs.IntVar(&cfg.WialonLoginLimit, "wialon-login-limit", wialon.DefaultLoginsPerMinute, "successful Wialon logins a minute for every replica of the egress group together (Wialon blocks an IP past 120)")
	fs.IntVar(&cfg.WialonFailedLoginLimit, "wialon-failed-login-limit", wialon.DefaultFailedLoginsPerMinute, "failed Wialon logins a minute for every replica of the egress group together (Wialon blocks an IP past 10)")
	fs.StringVar(&cfg.WialonEgressGroup, "wialon-egress-group", wialon.DefaultEgressGroup, "name of the egress IP address these replicas reach Wialon from: replicas with one group share one login budget")
	fs.DurationVar(&cfg.WialonRefusedTokenTTL, "wialon-refused-token-ttl", wialon.DefaultRefusedTTL, "how long a token Wialon refused is refused again without a login")
	fs.DurationVar(&cfg.WialonKeepAlive, "wialon-keepalive", wialon.DefaultKeepAlive, "log in with every stored Wialon token at least this often (Wialon deletes a token unused for 100 days)")
	fs.DurationVar(&cfg.KeepAliveSweep, "keepalive-sweep", credentials.DefaultKeepAliveSweep, "how often one replica looks for stored secrets due a keep-alive login (negative: never)")
}

// addHandleKeyFlag adds --handle-key-file, which both services need.
func addHandleKeyFlag(fs *flag.FlagSet, file *string) {
	fs.StringVar(file, "handle-key-file", "", "file of session handle keys shared by the credentials service and the gateway: one base64 key (32+ random bytes) per line, the first signs, all verify; required")
}

// addRedisWaitFlag adds --redis-wait-replicas to the commands that write credentials.
func addRedisWaitFlag(fs *flag.FlagSet, n *int) {
	fs.IntVar(n, "redis-wait-replicas", app.RedisWaitAuto, "replicas that must acknowledge each credential write and revocation (Redis WAIT) before it is reported done; -1: one if the topology has replicas, else none")
}

// addTransitBatchFlags adds the flags that shape how concurrent Vault
// transit calls share batch calls.
func addTransitBatchFlags(fs *flag.FlagSet, opts *transit.BatchOptions) {
	fs.IntVar(&opts.MaxItems, "transit-batch-size", transit.DefaultBatchMaxItems, "most items in one Vault transit batch call made of concurrent calls; 1 turns batching off")
	fs.IntVar(&opts.MaxInFlight, "transit-batch-calls", transit.DefaultBatchMaxInFlight, "Vault transit calls of one operation (encrypt, decrypt, hmac) under way at once; calls arriving beyond that wait and share the next")
	fs.DurationVar(&opts.MaxWait, "transit-batch-wait", 0, "hold a transit batch this long for more calls even when it could go at once (0: a lone call goes at once)")
}

func runCredentials(ctx context.Context, args []string) error {
	fs, cfg, logf, finish := credentialsFlags()
	return runService(ctx, "credentials", fs, logf, finish, args, func() error { return cfg.Validate() },
		func(ctx context.Context, d app.Deps) (*app.Built, error) { return app.BuildCredentials(ctx, *cfg, d) },
		func(ctx context.Context, d app.Deps) error { return app.Run(ctx, cfg, d) })
}

// runService is the one way a server subcommand starts: parse flags (with
// FLEETBROKER_* fallbacks), finish the config, make the logger, check the
// configuration as a whole (every problem at once, before anything is read
// or dialled), then either build everything and stop (--check-config: the
// files and the live dependencies) or serve.
func runService(ctx context.Context, name string, fs *flag.FlagSet, logf *logFlags, finish func(), args []string, validate func() error,
	build func(context.Context, app.Deps) (*app.Built, error), serve func(context.Context, app.Deps) error) error {
	checkOnly := addCheckConfigFlag(fs)
	logger, err := parseChecked(name, fs, args, logf, finish, validate)
	if err != nil {
		return err
	}
	d := app.Deps{Logger: logger}
	if *checkOnly {
		return checkConfig(ctx, name, func(ctx context.Context) (*app.Built, error) { return build(ctx, d) })
	}
	return serve(ctx, d)
}

// devFlags declares the flags of `fleetbroker dev`.
func devFlags() (*flag.FlagSet, *app.DevConfig, *logFlags) {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	cfg := &app.DevConfig{}
	fs.StringVar(&cfg.Listen, "listen", app.DefaultDevListen, "gRPC listen address of every service")
	fs.StringVar(&cfg.SimulatorListen, "simulator-listen", app.DefaultDevSimulatorListen, "listen address of the simulator")
	fs.StringVar(&cfg.AllowedUpstreams, "allowed-upstreams", "", "extra host[:port] a credential's base_url may name (the simulator is always allowed)")
	fs.BoolVar(&cfg.Reflection, "reflection", true, "serve gRPC reflection (for grpcurl)")
	fs.DurationVar(&cfg.MaxSessionTTL, "max-session-ttl", credentials.DefaultMaxSessionTTL, "maximum session handle lifetime")
	fs.IntVar(&cfg.FleetUpRate, "fleetup-rate", app.DefaultDevFleetUpRate, "FleetUp requests per second per account (the simulator needs no 1/s limit)")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", app.DefaultDevMetricsListen, "HTTP address serving Prometheus metrics at /metrics (empty: off)")
	fs.StringVar(&cfg.AuthorizeListen, "authorize-listen", app.DefaultDevAuthorizeListen, "listen address of the Wialon authorization callback (empty: off)")
	fs.StringVar(&cfg.AuthorizeReturnURLs, "authorize-return-urls", "", "extra return URLs a Wialon authorization may end at (dev's own page is always allowed)")
	fs.BoolVar(&cfg.ListenAnywhere, "dev-listen-anywhere", false, "let --listen and --metrics-listen bind non-loopback addresses (dev has no caller authentication: anyone who reaches the port may read and write every credential)")
	logf := addLogFlags(fs, "text") // dev is read by humans
	return fs, cfg, logf
}

func runDev(ctx context.Context, args []string) error {
	fs, cfg, logf := devFlags()
	logger, err := parseChecked("dev", fs, args, logf, func() {}, func() error { return cfg.Validate() })
	if err != nil {
		return err
	}
	return app.RunDev(ctx, *cfg, os.Stdout, logger)
}

// parseChecked parses args (with FLEETBROKER_* fallbacks), finishes the
// config, makes the logger and checks the configuration as a whole: every
// problem at once, before anything is read or dialled.
func parseChecked(name string, fs *flag.FlagSet, args []string, logf *logFlags, finish func(), validate func() error) (*slog.Logger, error) {
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	finish()
	logger, err := newLogger(logf.format, logf.level)
	if err != nil {
		return nil, err
	}
	if err := validate(); err != nil {
		return nil, fmt.Errorf("%s configuration:\n%w", name, err)
	}
	return logger, nil
}

// maintenanceFlags declares the flags of a maintenance command on the
// stored credentials (rewrap, migrate): Vault, Redis and logs.
func maintenanceFlags(name string) (*flag.FlagSet, *app.MaintenanceConfig, *logFlags, func()) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	cfg := &app.MaintenanceConfig{}
	addVaultFlags(fs, &cfg.Vault, app.DefaultCredentialsTransitKey)
	redis := addRedisFlags(fs, &cfg.RedisPrefix)
	addRedisWaitFlag(fs, &cfg.RedisWaitReplicas)
	logf := addLogFlags(fs, "json")
	return fs, cfg, logf, func() {
		vaultTokenFallback(&cfg.Vault)
		cfg.Redis = redis.config()
	}
}

// runMaintenance parses a maintenance command's flags, checks them and
// runs it with a logger.
func runMaintenance(name string, args []string, run func(app.MaintenanceConfig, app.Deps) error) error {
	fs, cfg, logf, finish := maintenanceFlags(name)
	logger, err := parseChecked(name, fs, args, logf, finish, func() error { return cfg.Validate() })
	if err != nil {
		return err
	}
	return run(*cfg, app.Deps{Logger: logger})
}

func runRewrap(ctx context.Context, args []string) error {
	return runMaintenance("rewrap", args, func(cfg app.MaintenanceConfig, d app.Deps) error {
		p, err := app.RunRewrap(ctx, cfg, d, func(p credentials.RewrapProgress) {
			if p.Seen%100 == 0 {
				fmt.Fprintf(os.Stderr, "rewrap: %d seen, %d rewrapped, %d skipped\n", p.Seen, p.Rewrapped, p.Skipped)
			}
		})
		fmt.Printf("rewrap: %d seen, %d rewrapped, %d skipped (replaced or deleted meanwhile)\n", p.Seen, p.Rewrapped, p.Skipped)
		return err
	})
}

// runMigrate re-seals every secret stored with version 1 associated data
// under version 2, and says how many it re-encrypted. It exits non-zero
// when a secret did not open, or the walk stopped.
func runMigrate(ctx context.Context, args []string) error {
	return runMaintenance("migrate", args, func(cfg app.MaintenanceConfig, d app.Deps) error {
		p, err := app.RunMigrate(ctx, cfg, d, func(p credentials.MigrateProgress) {
			if p.Seen%100 == 0 {
				fmt.Fprintf(os.Stderr, "migrate: %d seen, %d re-encrypted, %d already current\n", p.Seen, p.Migrated, p.Current)
			}
		})
		fmt.Printf("migrate: %d seen, %d re-encrypted, %d already current, %d skipped (replaced or deleted meanwhile), %d failed\n",
			p.Seen, p.Migrated, p.Current, p.Skipped, p.Failed)
		if err == nil && p.Failed > 0 {
			err = fmt.Errorf("migrate: %d secrets did not open with their record's associated data (see the log)", p.Failed)
		}
		return err
	})
}

// gatewayFlags declares the flags of `fleetbroker gateway`; the returned
// function finishes the config after parsing.
func gatewayFlags() (*flag.FlagSet, *app.GatewayConfig, *logFlags, func()) {
	fs := flag.NewFlagSet("gateway", flag.ContinueOnError)
	cfg := &app.GatewayConfig{}
	addServingFlags(fs, &cfg.Server, &cfg.Security, &cfg.MetricsListen, app.DefaultGatewayListen, app.DefaultGatewayMetricsListen,
		"optional policy file; the gateway uses only its api_keys (callers are authorized by their handle)")
	fs.StringVar(&cfg.CredentialsAddr, "credentials-addr", app.DefaultCredentialsAddr, "address of the credentials service")
	fs.StringVar(&cfg.CredentialsTLS.CAFile, "credentials-ca", "", "CA bundle that signed the credentials service's certificate")
	fs.StringVar(&cfg.CredentialsTLS.CertFile, "credentials-cert", "", "the gateway's client certificate towards the credentials service (mTLS)")
	fs.StringVar(&cfg.CredentialsTLS.KeyFile, "credentials-key", "", "the gateway's client key towards the credentials service")
	fs.StringVar(&cfg.CredentialsServerName, "credentials-server-name", "", "name to verify in the credentials service's certificate (default: the host of --credentials-addr)")
	fs.BoolVar(&cfg.CredentialsInsecure, "credentials-insecure", false, "dial the credentials service in plaintext (behind a sidecar that originates mTLS)")
	fs.StringVar(&cfg.CredentialsAPIKey, "credentials-api-key", "", "API key identifying the gateway to the credentials service where mTLS is not possible (prefer FLEETBROKER_CREDENTIALS_API_KEY)")
	addVaultFlags(fs, &cfg.Vault, app.DefaultGatewayTransitKey)
	redis := addRedisFlags(fs, &cfg.RedisPrefix)
	fs.StringVar(&cfg.AllowedUpstreams, "allowed-upstreams", "", "comma-separated host[:port] a credential's base_url may name (provider defaults are always allowed)")
	fs.DurationVar(&cfg.HandleCacheTTL, "handle-cache-ttl", gateway.DefaultHandleCacheTTL, "how long a handle resolution is reused (at most 5s; revocation takes effect within it)")
	fs.IntVar(&cfg.FleetUpRate, "fleetup-rate", app.DefaultFleetUpRate, "FleetUp requests per second per account, shared by all replicas")
	fs.IntVar(&cfg.FleetUpBurst, "fleetup-burst", app.DefaultFleetUpBurst, "FleetUp requests allowed in a burst above --fleetup-rate")
	fs.StringVar(&cfg.FleetUpRawPaths, "fleetup-raw-paths", "", "comma-separated FleetUp paths CallProvider may reach, exactly (default: the documented read-only endpoints; /token is never allowed)")
	fs.DurationVar(&cfg.JWTSafetyMargin, "jwt-safety-margin", gateway.DefaultJWTSafetyMargin, "a FleetUp JWT is replaced this long before it expires")
	fs.DurationVar(&cfg.WialonSessionTTL, "wialon-session-ttl", gateway.DefaultWialonSessionTTL, "how long a shared Wialon session is reused")
	fs.DurationVar(&cfg.UpstreamTimeout, "upstream-timeout", app.DefaultUpstreamTimeout, "timeout of each upstream HTTP call")
	fs.IntVar(&cfg.WialonSessionRequests, "wialon-session-requests", wialon.DefaultSessionRequests, "requests one shared Wialon session serves at once, across replicas (Wialon answers 1003 past 10)")
	fs.IntVar(&cfg.WialonSessionHeavy, "wialon-session-heavy", wialon.DefaultSessionHeavy, "heavy requests (message loads, trips, reports) one shared Wialon session serves at once, across replicas (Wialon: 3)")
	fs.DurationVar(&cfg.WialonLeaseTTL, "wialon-lease-ttl", wialon.DefaultLeaseTTL, "how long a session slot of a replica that died stays taken (slots are renewed every third of it)")
	fs.StringVar(&cfg.WialonRawServices, "wialon-raw-services", strings.Join(wialon.DefaultRawServices, ","), "comma-separated read-only Wialon services CallProvider may run, alone or in core/batch")
	fs.IntVar(&cfg.MaxStreamsPerHandle, "max-streams-per-handle", gateway.DefaultMaxStreamsPerHandle, "open WatchPositions streams one session handle may hold on this replica; more are refused RESOURCE_EXHAUSTED (negative: no limit)")
	fs.IntVar(&cfg.MaxStreamsPerTenant, "max-streams-per-tenant", gateway.DefaultMaxStreamsPerTenant, "open WatchPositions streams one tenant may hold on this replica; more are refused RESOURCE_EXHAUSTED (negative: no limit)")
	addHandleKeyFlag(fs, &cfg.HandleKeyFile)
	logf := addLogFlags(fs, "json")
	return fs, cfg, logf, func() {
		vaultTokenFallback(&cfg.Vault)
		cfg.Redis = redis.config()
	}
}

func runGateway(ctx context.Context, args []string) error {
	fs, cfg, logf, finish := gatewayFlags()
	return runService(ctx, "gateway", fs, logf, finish, args, func() error { return cfg.Validate() },
		func(ctx context.Context, d app.Deps) (*app.Built, error) { return app.BuildGateway(ctx, *cfg, d) },
		func(ctx context.Context, d app.Deps) error { return app.Run(ctx, cfg, d) })
}

// addCheckConfigFlag adds --check-config: build everything a server needs
// (flags, TLS files, policy, audit log, Vault login, Redis ping) and exit
// without serving, so a deployment can be checked before it takes traffic.
func addCheckConfigFlag(fs *flag.FlagSet) *bool {
	return fs.Bool("check-config", false, "check the configuration (files, Vault, Redis) and exit without serving")
}

func checkConfig(ctx context.Context, name string, build func(context.Context) (*app.Built, error)) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	built, err := build(ctx)
	if err != nil {
		return fmt.Errorf("%s configuration: %w", name, err)
	}
	built.Close()
	fmt.Printf("%s configuration OK\n", name)
	return nil
}
