package credentials

import (
	"context"
	"encoding/hex"
	"fmt"

	"google.golang.org/protobuf/proto"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// secret is a decoded upstream secret with the metadata that travels beside
// it. The base URL is metadata, not part of the encrypted bytes.
type secret struct {
	// provider is the provider's stored name; p is the provider.
	provider string
	p        provider.Provider
	baseURL  string
	// msg is the provider's secret message (WialonSecret, FleetUpSecret,
	// …) without its base URL.
	msg proto.Message
}

// errNoProvider means a PutCredential request whose secret no registered
// provider takes: a oneof case this server does not serve.
var errNoProvider = apierr.Field("secret", "no provider of this server takes this kind of secret")

// secretFromPut picks the secret out of a PutCredential request, through
// the provider that takes it, and fills in the provider's default base
// URL. It also returns the request field naming the base URL, for errors.
func (s *Service) secretFromPut(req *credentialsv1.PutCredentialRequest) (secret, string, error) {
	p, msg, baseURL, field, ok := s.cfg.Providers.ForPut(req)
	if !ok {
		return secret{}, "", errNoProvider
	}
	return secret{provider: p.Info().Name, p: p, baseURL: orDefault(baseURL, p.Info().DefaultBaseURL), msg: msg}, field, nil
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// plaintext is the byte form that gets encrypted: the provider's secret
// message without the base URL, marshalled deterministically so the
// fingerprint of equal secrets is equal.
func (sec secret) plaintext() ([]byte, error) {
	if sec.msg == nil {
		return nil, fmt.Errorf("no secret for provider %q", sec.provider)
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(sec.msg)
}

// decodeSecret is the inverse of plaintext for a stored record.
func (s *Service) decodeSecret(rec store.Credential, plaintext []byte) (secret, error) {
	p, ok := s.cfg.Providers.ByName(rec.Provider)
	if !ok {
		return secret{}, fmt.Errorf("decode secret: unknown provider %q", rec.Provider)
	}
	msg := p.NewSecret()
	if err := proto.Unmarshal(plaintext, msg); err != nil {
		return secret{}, fmt.Errorf("decode %s secret: malformed plaintext", rec.Provider)
	}
	return secret{provider: rec.Provider, p: p, baseURL: rec.BaseURL, msg: msg}, nil
}

// associatedData binds a ciphertext to its tenant and credential id, so a
// ciphertext copied into another row or tenant does not decrypt.
func associatedData(tenantID, credentialID string) []byte {
	return []byte("fleetbroker/credential/v1\x00" + tenantID + "\x00" + credentialID)
}

// encrypt seals the secret for (tenant, credential) and computes its
// fingerprint: a transit HMAC over tenant, provider and secret, cut to 128
// bits, so equal secrets within a tenant are recognizable but not reversible.
func (s *Service) encrypt(ctx context.Context, tenantID, credentialID string, sec secret) (ciphertext, fingerprint string, err error) {
	plain, err := sec.plaintext()
	if err != nil {
		return "", "", err
	}
	cts, err := s.cfg.Transit.Encrypt(ctx, tenantID, []transit.Item{{AssociatedData: associatedData(tenantID, credentialID), Plaintext: plain}})
	if err != nil {
		return "", "", fmt.Errorf("encrypt secret: %w", err)
	}
	mac, err := s.cfg.Transit.HMAC(ctx, append([]byte(tenantID+"\x00"+sec.provider+"\x00"), plain...))
	if err != nil {
		return "", "", fmt.Errorf("fingerprint secret: %w", err)
	}
	if len(mac) > 16 {
		mac = mac[:16]
	}
	return cts[0], "hmac-sha256:" + hex.EncodeToString(mac), nil
}

// decrypt opens a stored record's secret.
func (s *Service) decrypt(ctx context.Context, rec store.Credential) (secret, error) {
	plains, err := s.cfg.Transit.Decrypt(ctx, rec.TenantID, []transit.Item{{AssociatedData: associatedData(rec.TenantID, rec.CredentialID), Ciphertext: rec.Ciphertext}})
	if err != nil {
		return secret{}, fmt.Errorf("decrypt secret of %s/%s: %w", rec.TenantID, rec.CredentialID, err)
	}
	return s.decodeSecret(rec, plains[0])
}
