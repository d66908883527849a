package provider_test

import (
	"strings"
	"testing"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/providers"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
)

// renamed registers the provider f builds under another id, name or kind.
type renamed struct {
	provider.Provider
	info provider.Info
}

func (r renamed) Info() provider.Info { return r.info }

func with(f provider.Factory, change func(*provider.Info)) provider.Factory {
	return func(env provider.Env) provider.Provider {
		p := f(env)
		info := p.Info()
		change(&info)
		return renamed{Provider: p, info: info}
	}
}

func TestRegistry(t *testing.T) {
	reg, err := provider.NewRegistry(provider.Env{}, providers.All()...)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		id   provider.ID
		name string
		put  *credentialsv1.PutCredentialRequest
	}{
		{credentialsv1.Provider_PROVIDER_WIALON, wialon.Name, &credentialsv1.PutCredentialRequest{Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: "t", BaseUrl: "https://w.example"}}}},
		{credentialsv1.Provider_PROVIDER_FLEETUP, fleetup.Name, &credentialsv1.PutCredentialRequest{Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{ApiKey: "k", AccountId: 7, Secret: "s"}}}},
	} {
		byID, ok := reg.Lookup(tt.id)
		if !ok || byID.Info().Name != tt.name {
			t.Fatalf("Lookup(%v) = %v, %v", tt.id, byID, ok)
		}
		if byName, ok := reg.ByName(tt.name); !ok || byName != byID {
			t.Fatalf("ByName(%q) is not Lookup(%v)", tt.name, tt.id)
		}
		p, secret, _, field, ok := reg.ForPut(tt.put)
		if !ok || p != byID || secret == nil || !strings.HasPrefix(field, tt.name+".") {
			t.Fatalf("ForPut(%s secret) = %v, %v, %q, %v", tt.name, p, secret, field, ok)
		}
	}
	var names []string
	for _, p := range reg.All() {
		names = append(names, p.Info().Name)
	}
	if strings.Join(names, ",") != wialon.Name+","+fleetup.Name {
		t.Fatalf("All() = %v, want every provider ordered by id", names)
	}
	if _, ok := reg.Lookup(credentialsv1.Provider(99)); ok {
		t.Fatal("Lookup found an unregistered provider")
	}
	if _, _, _, _, ok := reg.ForPut(&credentialsv1.PutCredentialRequest{}); ok {
		t.Fatal("ForPut took a request without a secret")
	}
}

func TestRegistryRefusesAmbiguity(t *testing.T) {
	tests := []struct {
		name      string
		factories []provider.Factory
	}{
		{"same id twice", []provider.Factory{wialon.NewProvider, with(fleetup.NewProvider, func(i *provider.Info) { i.ID = credentialsv1.Provider_PROVIDER_WIALON })}},
		{"same name twice", []provider.Factory{wialon.NewProvider, with(fleetup.NewProvider, func(i *provider.Info) { i.Name = wialon.Name })}},
		{"no id", []provider.Factory{with(wialon.NewProvider, func(i *provider.Info) { i.ID = 0 })}},
		{"no token kind", []provider.Factory{with(wialon.NewProvider, func(i *provider.Info) { i.TokenKind = "" })}},
		{"colon in name", []provider.Factory{with(wialon.NewProvider, func(i *provider.Info) { i.Name = "wia:lon" })}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := provider.NewRegistry(provider.Env{}, tt.factories...); err == nil {
				t.Fatal("NewRegistry accepted it")
			}
		})
	}
}
