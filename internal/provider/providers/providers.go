// Package providers is the list of telematics providers fleetbroker serves.
// Both services build their provider.Registry from it; adding a provider
// adds one line here (docs/gateway.md, "Adding a provider").
package providers

import (
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
)

// All returns the factory of every provider, a new slice on each call.
func All() []provider.Factory {
	return []provider.Factory{
		wialon.NewProvider,
		fleetup.NewProvider,
	}
}
