package transit

import (
	"bytes"
	"context"
	"fmt"
)

// ProbeTenant is the derivation context of the readiness probes. No
// secret is ever encrypted under it; a tenant of that name learns nothing
// from the probes, which only encrypt the fixed probePlaintext.
const ProbeTenant = "fleetbroker-readiness-probe"

var probePlaintext = []byte("fleetbroker readiness probe")

// ProbeEncrypt checks that tr's key can be used right now: it encrypts a
// fixed value and decrypts it again, as the credentials service does with
// every secret. Unlike Vault's sys/health it fails when the key is missing
// (ErrKeyMissing) or the service's token may not use it (ErrInvalid), not
// only when Vault is down or sealed (ErrUnavailable).
func ProbeEncrypt(ctx context.Context, tr Transit) error {
	item := Item{AssociatedData: []byte("probe"), Plaintext: probePlaintext}
	cts, err := tr.Encrypt(ctx, ProbeTenant, []Item{item})
	if err != nil {
		return fmt.Errorf("transit probe: %w", err)
	}
	item.Ciphertext, item.Plaintext = cts[0], nil
	pts, err := tr.Decrypt(ctx, ProbeTenant, []Item{item})
	if err != nil {
		return fmt.Errorf("transit probe: %w", err)
	}
	if !bytes.Equal(pts[0], probePlaintext) {
		return fmt.Errorf("transit probe: the round trip returned other bytes: %w", ErrDecrypt)
	}
	return nil
}

// ProbeDataKey checks that tr's key can make and unwrap data keys right
// now, as the gateway's token cache does (transit datakey/wrapped, then
// decrypt): the key exists and the token may use it.
func ProbeDataKey(ctx context.Context, tr Transit) error {
	dk, err := tr.GenerateDataKey(ctx, ProbeTenant)
	if err != nil {
		return fmt.Errorf("transit probe: %w", err)
	}
	clear(dk.Plaintext)
	return nil
}
