package credentials

import (
	"context"
	"errors"
	"fmt"

	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// MigrateProgress reports how a migration run went so far.
type MigrateProgress struct {
	// Seen counts the credentials walked.
	Seen int
	// Migrated counts those re-encrypted under the current associated data.
	Migrated int
	// Current counts those sealed with it already: nothing to do.
	Current int
	// Skipped counts those replaced or deleted while the run went on.
	// A replacement is sealed by the replica that wrote it: current
	// unless it ran with --write-legacy-formats (a run after the upgrade
	// catches those).
	Skipped int
	// Failed counts those whose secret did not open (logged by tenant and
	// credential id): a ciphertext that does not match its record.
	Failed int
}

// Migrate re-seals every secret stored with version 1 associated data
// (tenant and credential id) under version 2, which also binds the
// provider, base URL and account id. Vault's rewrap cannot change a
// ciphertext's associated data, so each secret is decrypted and encrypted
// again; the plaintext lives in memory only between the two calls.
//
// It is safe under load and to run again: a credential already at version
// 2 is left alone, and the new ciphertext is written only if the
// credential is still at the version that was read (one replaced meanwhile
// is skipped). A credential whose secret does not open is counted as
// Failed and the walk goes on; an outage of Vault or Redis stops it (run it
// again). progress, if set, is called after every credential.
//
// Migration trusts the routing fields as they are stored: run it before
// anyone could have edited them, i.e. right after the upgrade.
func (s *Service) Migrate(ctx context.Context, progress func(MigrateProgress)) (MigrateProgress, error) {
	var p MigrateProgress
	if s.cfg.WriteLegacyFormats {
		return p, errors.New("migrate: this service writes version 1 associated data (--write-legacy-formats); finish the upgrade first")
	}
	err := s.cfg.Store.ForEachCredential(ctx, func(rec store.Credential) error {
		p.Seen++
		if err := s.migrate(ctx, rec, &p); err != nil {
			return err
		}
		if progress != nil {
			progress(p)
		}
		return nil
	})
	return p, err
}

func (s *Service) migrate(ctx context.Context, rec store.Credential, p *MigrateProgress) error {
	if rec.ADVersion >= ADRouting {
		p.Current++
		return nil
	}
	sec, err := s.decrypt(ctx, rec)
	if errors.Is(err, transit.ErrDecrypt) {
		p.Failed++
		s.cfg.Logger.ErrorContext(ctx, "migrate: secret does not open with its record's associated data; leaving it as it is",
			"tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "error", err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("migrate %s/%s: %w", rec.TenantID, rec.CredentialID, err)
	}
	ct, v, err := s.seal(ctx, rec, sec)
	if err != nil {
		return fmt.Errorf("migrate %s/%s: %w", rec.TenantID, rec.CredentialID, err)
	}
	err = s.cfg.Store.UpdateCiphertext(ctx, rec.TenantID, rec.CredentialID, rec.Version, ct, v)
	switch {
	case errors.Is(err, store.ErrVersionConflict), errors.Is(err, store.ErrNotFound):
		p.Skipped++
	case err != nil:
		return fmt.Errorf("store migrated %s/%s: %w", rec.TenantID, rec.CredentialID, err)
	default:
		p.Migrated++
	}
	return nil
}
