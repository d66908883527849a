package credentials

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// secret is a decoded upstream secret with the metadata that travels beside
// it (provider, base URL, FleetUp account id). The base URL is metadata,
// not part of the encrypted bytes.
type secret struct {
	provider string
	baseURL  string
	wialon   *credentialsv1.WialonSecret
	fleetup  *credentialsv1.FleetUpSecret
}

// secretFromPut picks the secret out of a PutCredential request and fills in
// the provider's default base URL.
func secretFromPut(req *credentialsv1.PutCredentialRequest) secret {
	switch v := req.GetSecret().(type) {
	case *credentialsv1.PutCredentialRequest_Wialon:
		return secret{provider: store.ProviderWialon, baseURL: orDefault(v.Wialon.GetBaseUrl(), upstream.DefaultWialonBaseURL), wialon: v.Wialon}
	case *credentialsv1.PutCredentialRequest_Fleetup:
		return secret{provider: store.ProviderFleetUp, baseURL: orDefault(v.Fleetup.GetBaseUrl(), upstream.DefaultFleetUpBaseURL), fleetup: v.Fleetup}
	}
	return secret{}
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// baseURLField names the request field holding a secret's base URL, for
// errors about it.
func (sec secret) baseURLField() string {
	if sec.provider == store.ProviderWialon {
		return "wialon.base_url"
	}
	return "fleetup.base_url"
}

// plaintext is the byte form that gets encrypted: the provider's secret
// message without the base URL, marshalled deterministically so the
// fingerprint of equal secrets is equal.
func (sec secret) plaintext() ([]byte, error) {
	var msg proto.Message
	switch sec.provider {
	case store.ProviderWialon:
		msg = &credentialsv1.WialonSecret{Token: sec.wialon.GetToken()}
	case store.ProviderFleetUp:
		msg = &credentialsv1.FleetUpSecret{ApiKey: sec.fleetup.GetApiKey(), AccountId: sec.fleetup.GetAccountId(), Secret: sec.fleetup.GetSecret()}
	default:
		return nil, fmt.Errorf("unknown provider %q", sec.provider)
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(msg)
}

// decodeSecret is the inverse of plaintext for a stored record.
func decodeSecret(rec store.Credential, plaintext []byte) (secret, error) {
	sec := secret{provider: rec.Provider, baseURL: rec.BaseURL}
	switch rec.Provider {
	case store.ProviderWialon:
		sec.wialon = &credentialsv1.WialonSecret{}
		if err := proto.Unmarshal(plaintext, sec.wialon); err != nil {
			return secret{}, fmt.Errorf("decode wialon secret: malformed plaintext")
		}
		sec.wialon.BaseUrl = rec.BaseURL
	case store.ProviderFleetUp:
		sec.fleetup = &credentialsv1.FleetUpSecret{}
		if err := proto.Unmarshal(plaintext, sec.fleetup); err != nil {
			return secret{}, fmt.Errorf("decode fleetup secret: malformed plaintext")
		}
		sec.fleetup.BaseUrl = rec.BaseURL
	default:
		return secret{}, fmt.Errorf("unknown provider %q", rec.Provider)
	}
	return sec, nil
}
