package credentials

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/provider"
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
