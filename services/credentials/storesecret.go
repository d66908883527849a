package credentials

import (
	"context"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// storeRequest is a secret ready to be stored: its base URL already checked
// against the allow-list and, unless the caller skipped it, validated.
type storeRequest struct {
	TenantID     string
	CredentialID string
	Secret       secret
	Labels       map[string]string
	Validation   store.Validation
	// TokenExpireTime is when the token stops working, if known.
	TokenExpireTime time.Time
}

// storeSecret encrypts a checked secret and stores it (creating the
// credential or replacing its secret), then announces the change. It is the
// one path by which PutCredential and the Wialon authorization callback
// write a credential. Errors are for toStatus.
func (s *Service) storeSecret(ctx context.Context, r storeRequest) (store.Credential, bool, error) {
	ciphertext, fingerprint, err := s.encrypt(ctx, r.TenantID, r.CredentialID, r.Secret)
	if err != nil {
		return store.Credential{}, false, err
	}
	now := s.cfg.Now()
	rec := store.Credential{
		TenantID:          r.TenantID,
		CredentialID:      r.CredentialID,
		Provider:          r.Secret.provider,
		Ciphertext:        ciphertext,
		Fingerprint:       fingerprint,
		BaseURL:           r.Secret.baseURL,
		FleetUpAccountID:  r.Secret.accountID(),
		Labels:            r.Labels,
		CreateTime:        now,
		UpdateTime:        now,
		ValidateTime:      r.Validation.Time,
		ValidationState:   r.Validation.State,
		ValidationMessage: r.Validation.Message,
		UpstreamUser:      r.Validation.UpstreamUser,
		TokenExpireTime:   r.TokenExpireTime,
	}
	stored, created, err := s.cfg.Store.PutCredential(ctx, rec)
	if err != nil {
		return store.Credential{}, false, err
	}
	s.cfg.Logger.InfoContext(ctx, "credential stored", "tenant_id", stored.TenantID, "credential_id", stored.CredentialID,
		"provider", stored.Provider, "version", stored.Version, "created", created, "validation_state", stored.ValidationState)
	s.emitStored(ctx, stored, created)
	return stored, created, nil
}
