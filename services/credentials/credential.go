package credentials

import (
	"context"
	"errors"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// PutCredential checks the base URL against the allow-list, validates the
// secret with the provider (unless skipped), encrypts it and stores it.
// Nothing is stored when any step fails.
func (c *credentialServer) PutCredential(ctx context.Context, req *credentialsv1.PutCredentialRequest) (*credentialsv1.PutCredentialResponse, error) {
	sec, baseURLField, err := c.s.secretFromPut(req)
	if err != nil {
		return nil, err
	}
	return c.s.put(ctx, req.GetTenantId(), req.GetCredentialId(), sec, putOptions{
		baseURLField: baseURLField, labels: req.GetLabels(), skipValidation: req.GetSkipValidation(),
		requestID: req.GetRequestId(), expectedVersion: req.ExpectedVersion, request: req,
	})
}

// putOptions is what put needs beside the secret.
type putOptions struct {
	// baseURLField names the request field of the base URL, for errors.
	baseURLField   string
	labels         map[string]string
	skipValidation bool
	// requestID makes the put idempotent (AIP-155); request is the message
	// hashed so a reused id with another request is refused.
	requestID       string
	request         proto.Message
	expectedVersion *int64
	// validated, if set, is the provider's answer about the secret that
	// the caller already has (the Wialon authorization callback logged in
	// with the token to inspect it): it is stored as is, and the provider
	// is not asked again.
	validated *store.Validation
	// tokenExpireTime is when the secret stops working upstream, if known.
	tokenExpireTime time.Time
}

// SecretPut is a PutCredential whose secret is already out of the request.
type SecretPut struct {
	TenantID     string
	CredentialID string
	Provider     provider.ID
	// Secret is the provider's secret message, without its base URL.
	Secret proto.Message
	// BaseURL is the credential's upstream; empty means the provider's default.
	BaseURL        string
	Labels         map[string]string
	SkipValidation bool
}

// PutSecret is PutCredential for in-process code that holds a provider's
// secret message itself: a provider whose secret has no case in
// PutCredentialRequest's oneof yet, such as the test of a new provider
// (docs/gateway.md, "Adding a provider"). It checks, validates and stores
// exactly as PutCredential does, but no interceptor authorizes the caller
// or validates the request: never expose it to a network caller.
func (s *Service) PutSecret(ctx context.Context, in SecretPut) (*credentialsv1.PutCredentialResponse, error) {
	p, ok := s.cfg.Providers.Lookup(in.Provider)
	if !ok || in.Secret == nil {
		return nil, errNoProvider
	}
	sec := secret{provider: p.Info().Name, p: p, baseURL: orDefault(in.BaseURL, p.Info().DefaultBaseURL), msg: in.Secret}
	return s.put(ctx, in.TenantID, in.CredentialID, sec, putOptions{baseURLField: "base_url", labels: in.Labels, skipValidation: in.SkipValidation})
}

func (s *Service) put(ctx context.Context, tenantID, credentialID string, sec secret, opts putOptions) (*credentialsv1.PutCredentialResponse, error) {
	if err := s.cfg.AllowList.Check(sec.baseURL); err != nil {
		return nil, apierr.Field(opts.baseURLField, "base URL not allowed: "+err.Error())
	}
	validation := store.Validation{State: store.ValidationNotValidated}
	switch {
	case opts.validated != nil:
		validation = *opts.validated
	case !opts.skipValidation:
		v, err := s.validate(ctx, sec)
		if err != nil {
			return nil, s.toStatus(ctx, "validate credential", err)
		}
		validation = v
	}
	rec := s.newRecord(tenantID, credentialID, sec, opts.labels, validation)
	rec.TokenExpireTime = opts.tokenExpireTime
	if err := s.sealRecord(ctx, &rec, sec); err != nil {
		return nil, s.toStatus(ctx, "put credential", err)
	}
	idem, parts, err := s.idempotent(ctx, "put", opts.requestID, opts.request)
	if err != nil {
		return nil, s.toStatus(ctx, "put credential", err)
	}
	res, err := s.cfg.Store.PutCredential(ctx, rec, store.PutOptions{Request: idem, ExpectedVersion: opts.expectedVersion})
	if errors.Is(err, store.ErrVersionConflict) && opts.expectedVersion != nil {
		return nil, errNotAtExpectedVersion(*opts.expectedVersion)
	}
	if err != nil {
		return nil, s.toStatus(ctx, "put credential", err)
	}
	if err := s.checkReplay(res.Replay, parts); err != nil {
		return nil, err
	}
	stored, created := res.Credential, res.Created
	s.cfg.Logger.InfoContext(ctx, "credential stored", "tenant_id", stored.TenantID, "credential_id", stored.CredentialID,
		"provider", stored.Provider, "version", stored.Version, "created", created, "validation_state", stored.ValidationState, "replayed", res.Replayed)
	if !res.Replayed {
		s.emitStored(ctx, stored, created)
	}
	return &credentialsv1.PutCredentialResponse{Credential: s.toProto(stored), Created: created}, nil
}

// newRecord is the record a put of sec stores, before it is sealed.
func (s *Service) newRecord(tenantID, credentialID string, sec secret, labels map[string]string, validation store.Validation) store.Credential {
	now := s.cfg.Now()
	return store.Credential{
		TenantID:          tenantID,
		CredentialID:      credentialID,
		Provider:          sec.provider,
		BaseURL:           sec.baseURL,
		FleetUpAccountID:  sec.p.Describe(sec.msg).AccountID,
		Labels:            labels,
		CreateTime:        now,
		UpdateTime:        now,
		ValidateTime:      validation.Time,
		ValidationState:   validation.State,
		ValidationMessage: validation.Message,
		UpstreamUser:      validation.UpstreamUser,
		LastUsedTime:      validation.Time, // a validation logs in: zero when skipped
	}
}

// validate asks the provider about sec. A provider rejection is returned as
// an *upstream.Error of KindRejected.
func (s *Service) validate(ctx context.Context, sec secret) (store.Validation, error) {
	user, err := sec.p.Validate(ctx, sec.baseURL, sec.msg)
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
	return &credentialsv1.GetCredentialResponse{Credential: c.s.toProto(rec)}, nil
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
		resp.Credentials = append(resp.Credentials, c.s.toProto(rec))
	}
	return resp, nil
}

func (c *credentialServer) DeleteCredential(ctx context.Context, req *credentialsv1.DeleteCredentialRequest) (*credentialsv1.DeleteCredentialResponse, error) {
	idem, parts, err := c.s.idempotent(ctx, "delete", req.GetRequestId(), req)
	if err != nil {
		return nil, c.s.toStatus(ctx, "delete credential", err)
	}
	res, err := c.s.cfg.Store.DeleteCredential(ctx, req.GetTenantId(), req.GetCredentialId(), idem)
	if err != nil {
		return nil, c.s.toStatus(ctx, "delete credential", err)
	}
	if err := c.s.checkReplay(res.Replay, parts); err != nil {
		return nil, err
	}
	c.s.cfg.Logger.InfoContext(ctx, "credential deleted", "tenant_id", req.GetTenantId(), "credential_id", req.GetCredentialId(), "revoked_sessions", res.Revoked, "replayed", res.Replayed)
	if !res.Replayed {
		c.s.emitDeleted(ctx, req.GetTenantId(), req.GetCredentialId())
	}
	return &credentialsv1.DeleteCredentialResponse{RevokedSessions: res.Revoked}, nil
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
	if err == nil {
		s.recordUse(ctx, rec)
	}
	updated, err := s.cfg.Store.SetValidation(ctx, rec.TenantID, rec.CredentialID, rec.Version, validation)
	if err != nil {
		return nil, s.toStatus(ctx, "validate credential", err)
	}
	s.cfg.Logger.InfoContext(ctx, "credential validated", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "version", rec.Version, "validation_state", validation.State)
	if validation.State == store.ValidationRejected {
		s.emitRejected(ctx, rec, validation.Message)
	}
	return &credentialsv1.ValidateCredentialResponse{Credential: s.toProto(updated)}, nil
}

// toProto converts a stored record to its public form: metadata only.
func (s *Service) toProto(rec store.Credential) *credentialsv1.Credential {
	out := &credentialsv1.Credential{
		TenantId:          rec.TenantID,
		CredentialId:      rec.CredentialID,
		Provider:          s.providerID(rec.Provider),
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
	if !rec.LastUsedTime.IsZero() {
		out.LastUseTime = timestamppb.New(rec.LastUsedTime)
	}
	return out
}

// providerID is the enum value of a stored provider name; UNSPECIFIED for
// a provider this server does not serve.
func (s *Service) providerID(name string) credentialsv1.Provider {
	if p, ok := s.cfg.Providers.ByName(name); ok {
		return p.Info().ID
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
