package credentials

import (
	"context"
	"errors"

	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// PutCredential checks the base URL against the allow-list, validates the
// secret with the provider (unless skipped), encrypts it and stores it.
// Nothing is stored when any step fails.
func (c *credentialServer) PutCredential(ctx context.Context, req *credentialsv1.PutCredentialRequest) (*credentialsv1.PutCredentialResponse, error) {
	s := c.s
	sec := secretFromPut(req)
	if err := s.cfg.AllowList.Check(sec.baseURL); err != nil {
		return nil, apierr.Field(sec.baseURLField(), "base URL not allowed: "+err.Error())
	}
	validation := store.Validation{State: store.ValidationNotValidated}
	if !req.GetSkipValidation() {
		v, err := s.validate(ctx, sec)
		if err != nil {
			return nil, s.toStatus(ctx, "validate credential", err)
		}
		validation = v
	}
	stored, created, err := s.storeSecret(ctx, storeRequest{TenantID: req.GetTenantId(), CredentialID: req.GetCredentialId(),
		Secret: sec, Labels: req.GetLabels(), Validation: validation})
	if err != nil {
		return nil, s.toStatus(ctx, "put credential", err)
	}
	return &credentialsv1.PutCredentialResponse{Credential: toProto(stored), Created: created}, nil
}

// validate asks the provider about sec. A provider rejection is returned as
// an *upstream.Error of KindRejected.
func (s *Service) validate(ctx context.Context, sec secret) (store.Validation, error) {
	var user string
	var err error
	switch sec.provider {
	case store.ProviderWialon:
		user, err = s.cfg.Validator.ValidateWialon(ctx, sec.baseURL, sec.wialon.GetToken())
	case store.ProviderFleetUp:
		err = s.cfg.Validator.ValidateFleetUp(ctx, sec.baseURL, sec.fleetup.GetApiKey(), sec.fleetup.GetAccountId(), sec.fleetup.GetSecret())
	}
	if err != nil {
		return store.Validation{}, err
	}
	return store.Validation{State: store.ValidationValid, UpstreamUser: user, Time: s.cfg.Now()}, nil
}

func (c *credentialServer) GetCredential(ctx context.Context, req *credentialsv1.GetCredentialRequest) (*credentialsv1.GetCredentialResponse, error) {
	rec, err := c.s.cfg.Store.GetCredential(ctx, req.GetTenantId(), req.GetCredentialId())
	if err != nil {
		return nil, c.s.toStatus(ctx, "get credential", err)
	}
	return &credentialsv1.GetCredentialResponse{Credential: toProto(rec)}, nil
}

func (c *credentialServer) ListCredentials(ctx context.Context, req *credentialsv1.ListCredentialsRequest) (*credentialsv1.ListCredentialsResponse, error) {
	size := int(req.GetPageSize())
	if size == 0 {
		size = defaultPageSize
	}
	recs, next, err := c.s.cfg.Store.ListCredentials(ctx, req.GetTenantId(), size, req.GetPageToken())
	if errors.Is(err, store.ErrInvalidArgument) {
		return nil, apierr.Field("page_token", "invalid page token: pass next_page_token from the previous page unchanged")
	}
	if err != nil {
		return nil, c.s.toStatus(ctx, "list credentials", err)
	}
	resp := &credentialsv1.ListCredentialsResponse{NextPageToken: next}
	for _, rec := range recs {
		resp.Credentials = append(resp.Credentials, toProto(rec))
	}
	return resp, nil
}

func (c *credentialServer) DeleteCredential(ctx context.Context, req *credentialsv1.DeleteCredentialRequest) (*credentialsv1.DeleteCredentialResponse, error) {
	revoked, err := c.s.cfg.Store.DeleteCredential(ctx, req.GetTenantId(), req.GetCredentialId())
	if err != nil {
		return nil, c.s.toStatus(ctx, "delete credential", err)
	}
	c.s.cfg.Logger.InfoContext(ctx, "credential deleted", "tenant_id", req.GetTenantId(), "credential_id", req.GetCredentialId(), "revoked_sessions", revoked)
	c.s.emitDeleted(ctx, req.GetTenantId(), req.GetCredentialId())
	return &credentialsv1.DeleteCredentialResponse{RevokedSessions: revoked}, nil
}

// ValidateCredential asks the provider about the stored secret and records
// the answer. A rejection is an answer, not an error: it comes back as
// VALIDATION_STATE_REJECTED. An outage leaves the state as it was.
func (c *credentialServer) ValidateCredential(ctx context.Context, req *credentialsv1.ValidateCredentialRequest) (*credentialsv1.ValidateCredentialResponse, error) {
	s := c.s
	rec, err := s.cfg.Store.GetCredential(ctx, req.GetTenantId(), req.GetCredentialId())
	if err != nil {
		return nil, s.toStatus(ctx, "validate credential", err)
	}
	sec, err := s.decrypt(ctx, rec)
	if err != nil {
		return nil, s.toStatus(ctx, "validate credential", err)
	}
	validation, err := s.validate(ctx, sec)
	if kind := upstream.KindOf(err); kind == upstream.KindRejected || kind == upstream.KindAccessDenied {
		var ue *upstream.Error
		errors.As(err, &ue)
		validation = store.Validation{State: store.ValidationRejected, Message: ue.Provider + " rejected the credential: " + reasonOr(ue, "bad credentials"), UpstreamUser: rec.UpstreamUser, Time: s.cfg.Now()}
	} else if err != nil {
		return nil, s.toStatus(ctx, "validate credential", err)
	}
	updated, err := s.cfg.Store.SetValidation(ctx, rec.TenantID, rec.CredentialID, rec.Version, validation)
	if err != nil {
		return nil, s.toStatus(ctx, "validate credential", err)
	}
	s.cfg.Logger.InfoContext(ctx, "credential validated", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "version", rec.Version, "validation_state", validation.State)
	if validation.State == store.ValidationRejected {
		s.emitRejected(ctx, rec, validation.Message)
	}
	return &credentialsv1.ValidateCredentialResponse{Credential: toProto(updated)}, nil
}

// toProto converts a stored record to its public form: metadata only.
func toProto(rec store.Credential) *credentialsv1.Credential {
	out := &credentialsv1.Credential{
		TenantId:          rec.TenantID,
		CredentialId:      rec.CredentialID,
		Provider:          providerToProto(rec.Provider),
		Version:           rec.Version,
		Fingerprint:       rec.Fingerprint,
		CreateTime:        timestamppb.New(rec.CreateTime),
		UpdateTime:        timestamppb.New(rec.UpdateTime),
		ValidationState:   validationToProto(rec.ValidationState),
		ValidationMessage: rec.ValidationMessage,
		UpstreamUser:      rec.UpstreamUser,
		Labels:            rec.Labels,
		BaseUrl:           rec.BaseURL,
		FleetupAccountId:  rec.FleetUpAccountID,
	}
	if !rec.ValidateTime.IsZero() {
		out.ValidateTime = timestamppb.New(rec.ValidateTime)
	}
	if !rec.TokenExpireTime.IsZero() {
		out.TokenExpireTime = timestamppb.New(rec.TokenExpireTime)
	}
	return out
}

func providerToProto(p string) credentialsv1.Provider {
	switch p {
	case store.ProviderWialon:
		return credentialsv1.Provider_PROVIDER_WIALON
	case store.ProviderFleetUp:
		return credentialsv1.Provider_PROVIDER_FLEETUP
	}
	return credentialsv1.Provider_PROVIDER_UNSPECIFIED
}

func validationToProto(v string) credentialsv1.ValidationState {
	switch v {
	case store.ValidationNotValidated:
		return credentialsv1.ValidationState_VALIDATION_STATE_NOT_VALIDATED
	case store.ValidationValid:
		return credentialsv1.ValidationState_VALIDATION_STATE_VALID
	case store.ValidationRejected:
		return credentialsv1.ValidationState_VALIDATION_STATE_REJECTED
	}
	return credentialsv1.ValidationState_VALIDATION_STATE_UNSPECIFIED
}
