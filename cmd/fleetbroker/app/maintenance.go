package app

import (
	"context"

	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// MaintenanceConfig configures the maintenance commands on the stored
// credentials, `fleetbroker rewrap` and `fleetbroker migrate`: where Vault
// and Redis are, and how credential writes wait for replicas.
type MaintenanceConfig struct {
	Vault             VaultConfig
	Redis             RedisConfig
	RedisPrefix       string
	RedisWaitReplicas int
}

// SetDefaults fills the settings left empty with the flags' defaults.
func (cfg *MaintenanceConfig) SetDefaults() {
	setVaultDefaults(&cfg.Vault, DefaultCredentialsTransitKey)
	cfg.Redis.SetDefaults()
	cfg.RedisPrefix = keyspace.Prefix(cfg.RedisPrefix)
}

// Validate reports every problem at once, before anything is dialled.
func (cfg MaintenanceConfig) Validate() error {
	var p problems
	p.add(validateVault(cfg.Vault))
	p.add(cfg.Redis.validate())
	return p.err()
}

// RunRewrap rewraps every stored ciphertext under the newest transit key
// version (after `vault write transit/keys/<key>/rotate`).
func RunRewrap(ctx context.Context, cfg MaintenanceConfig, d Deps, progress func(credentials.RewrapProgress)) (credentials.RewrapProgress, error) {
	return withOfflineService(ctx, cfg, d, func(svc *credentials.Service) (credentials.RewrapProgress, error) {
		return svc.Rewrap(ctx, progress)
	})
}

// RunMigrate re-seals every secret stored with version 1 associated data
// under version 2 (see credentials.Service.Migrate).
func RunMigrate(ctx context.Context, cfg MaintenanceConfig, d Deps, progress func(credentials.MigrateProgress)) (credentials.MigrateProgress, error) {
	return withOfflineService(ctx, cfg, d, func(svc *credentials.Service) (credentials.MigrateProgress, error) {
		return svc.Migrate(ctx, progress)
	})
}

// withOfflineService runs fn on a credentials service that serves no
// calls, on the configured Vault and Redis (unless d holds them). It needs
// no handle keys (it issues and checks no handle), so unless d has some it
// gets throwaway ones; and it publishes no events.
func withOfflineService[P any](ctx context.Context, cfg MaintenanceConfig, d Deps, fn func(*credentials.Service) (P, error)) (P, error) {
	var none P
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return none, err
	}
	if d.HandleKeys == nil {
		keys, err := handle.GenerateKeys()
		if err != nil {
			return none, err
		}
		d.HandleKeys = keys
	}
	b := newBuilder(d)
	defer b.closers.closeAll()
	if err := b.dial(ctx, cfg.Vault, cfg.Redis); err != nil {
		return none, err
	}
	credCfg := CredentialsConfig{RedisPrefix: cfg.RedisPrefix, RedisWaitReplicas: cfg.RedisWaitReplicas, Redis: cfg.Redis}
	credCfg.SetDefaults()
	st, err := credentialStore(ctx, credCfg, b.d.Redis, b.logger)
	if err != nil {
		return none, err
	}
	offline := b.d
	offline.Store, offline.Redis = st, nil // the store's client only: no events, no connect flow
	svc, err := newCredentialsService(credCfg, offline, b.d.Transit, nil)
	if err != nil {
		return none, err
	}
	return fn(svc)
}
