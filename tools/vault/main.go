// Command vault builds the HashiCorp Vault server from the Go module proxy so
// tests can run a real `vault server -dev` on machines without a Vault package.
// It is a separate module and is never imported by fleetbroker itself.
package main

import (
	"os"

	"github.com/hashicorp/vault/command"
)

func main() {
	os.Exit(command.Run(os.Args[1:]))
}
