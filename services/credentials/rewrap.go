package credentials

import (
	"context"
	"errors"
	"fmt"

	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// RewrapProgress reports how a rewrap run went so far.
type RewrapProgress struct {
	Seen, Rewrapped, Skipped int
}

// Rewrap re-encrypts every stored ciphertext under the newest transit key
// version, keeping its associated data (and version) as it is. It is
// idempotent and resumable: rewrapping a ciphertext that is already current
// is harmless, and a credential replaced while the run goes on is skipped
// (its new ciphertext is current already). progress, if set, is called
// after every credential.
func (s *Service) Rewrap(ctx context.Context, progress func(RewrapProgress)) (RewrapProgress, error) {
	var p RewrapProgress
	err := s.cfg.Store.ForEachCredential(ctx, func(rec store.Credential) error {
		p.Seen++
		item, err := s.openItem(rec)
		if err != nil {
			return fmt.Errorf("rewrap %s/%s: %w", rec.TenantID, rec.CredentialID, err)
		}
		out, err := s.cfg.Transit.Rewrap(ctx, rec.TenantID, []transit.Item{item})
		if err != nil {
			return fmt.Errorf("rewrap %s/%s: %w", rec.TenantID, rec.CredentialID, err)
		}
		err = s.cfg.Store.UpdateCiphertext(ctx, rec.TenantID, rec.CredentialID, rec.Version, out[0], rec.ADVersion)
		switch {
		case errors.Is(err, store.ErrVersionConflict), errors.Is(err, store.ErrNotFound):
			p.Skipped++
		case err != nil:
			return fmt.Errorf("store rewrapped %s/%s: %w", rec.TenantID, rec.CredentialID, err)
		default:
			p.Rewrapped++
		}
		if progress != nil {
			progress(p)
		}
		return nil
	})
	return p, err
}
