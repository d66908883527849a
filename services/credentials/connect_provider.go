package credentials

import (
	"errors"
	"fmt"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// The flow's provider touchpoints, in one place: the provider it connects
// accounts of and the provider.Connector that provider implements (its
// authorization page, the secret its redirect carries, what it says about
// that secret). Everything else of the flow is provider-neutral.

// connectProvider is the provider whose accounts StartWialonAuthorization
// connects.
const connectProvider = credentialsv1.Provider_PROVIDER_WIALON

// connectorOf returns the registry's connectProvider and its Connector.
func connectorOf(reg *provider.Registry) (provider.Provider, provider.Connector, error) {
	if reg == nil {
		return nil, nil, errors.New("no providers")
	}
	p, ok := reg.Lookup(connectProvider)
	if !ok {
		return nil, nil, fmt.Errorf("provider %s is not served", connectProvider)
	}
	c, ok := p.(provider.Connector)
	if !ok {
		return nil, nil, fmt.Errorf("provider %s has no authorization page (provider.Connector)", p.Info().Name)
	}
	return p, c, nil
}
