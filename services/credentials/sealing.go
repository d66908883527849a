package credentials

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sync/errgroup"

	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Versions of the associated data a secret is sealed with. The version is
// stored beside each ciphertext (store.Credential.ADVersion), because
// Vault's rewrap keeps a ciphertext's associated data as it was: a record
// is opened with the version it was sealed with, and `fleetbroker migrate`
// re-seals version 1 records as version 2.
const (
	// ADTenantCredential (1) binds tenant and credential id: a ciphertext
	// copied into another row does not decrypt, but one whose base URL was
	// edited in Redis does, and its secret goes to the new host.
	ADTenantCredential = 1
	// ADRouting (2) also binds the provider, the base URL and the account
	// id: everything that decides where the decrypted secret is sent, so
	// editing any of them in Redis makes the secret unreadable.
	ADRouting = 2
)

// errLegacyAD is a version 1 record read while they are refused.
var errLegacyAD = errors.New("the secret is sealed with version 1 associated data, which this service no longer opens (--legacy-associated-data=false); run fleetbroker migrate")

// associatedData is what a record's ciphertext is bound to, in version v.
// Version 2 takes the routing fields from the record's metadata: a secret
// is opened only for the provider, base URL and account it was stored for.
func associatedData(v int, rec store.Credential) ([]byte, error) {
	switch v {
	case ADTenantCredential:
		return []byte("fleetbroker/credential/v1\x00" + rec.TenantID + "\x00" + rec.CredentialID), nil
	case ADRouting:
		// Length-prefixed: a base URL is free text, so no separator is safe.
		out := []byte("fleetbroker/credential/v2")
		for _, f := range []string{rec.TenantID, rec.CredentialID, rec.Provider, rec.BaseURL, strconv.FormatInt(rec.FleetUpAccountID, 10)} {
			out = binary.BigEndian.AppendUint32(out, uint32(len(f)))
			out = append(out, f...)
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown associated data version %d", v)
}

// sealVersion is the associated data version new ciphertexts get: the
// current one, or version 1 while --write-legacy-formats keeps records
// readable by replicas of the release before it.
func (s *Service) sealVersion() int {
	if s.cfg.WriteLegacyFormats {
		return ADTenantCredential
	}
	return ADRouting
}

// seal encrypts the secret for the record (whose routing fields must be
// set) and returns the ciphertext and the associated data version used.
func (s *Service) seal(ctx context.Context, rec store.Credential, sec secret) (string, int, error) {
	plain, err := sec.plaintext()
	if err != nil {
		return "", 0, err
	}
	v := s.sealVersion()
	ad, err := associatedData(v, rec)
	if err != nil {
		return "", 0, err
	}
	cts, err := s.cfg.Transit.Encrypt(ctx, rec.TenantID, []transit.Item{{AssociatedData: ad, Plaintext: plain}})
	if err != nil {
		return "", 0, fmt.Errorf("encrypt secret: %w", err)
	}
	return cts[0], v, nil
}

// sealRecord seals sec for rec, whose routing fields (tenant, id,
// provider, base URL, account id) must be set, and fills in its
// ciphertext, associated data version and fingerprint. The encrypt and the
// HMAC run at once (two transit calls, which batching shares with other
// callers), so a put waits for one transit round trip, not two.
func (s *Service) sealRecord(ctx context.Context, rec *store.Credential, sec secret) error {
	var (
		ct string
		v  int
		fp string
	)
	// Not errgroup.WithContext: a failed HMAC must not cancel the encrypt,
	// whose own failure says more (a missing key is found by a check after
	// the refused encrypt, which a cancelled context would cut short and
	// report as Vault unavailable).
	var g errgroup.Group
	g.Go(func() (err error) {
		fp, err = s.fingerprint(ctx, rec.TenantID, sec)
		return err
	})
	ct, v, err := s.seal(ctx, *rec, sec)
	if gerr := g.Wait(); err == nil {
		err = gerr
	}
	if err != nil {
		return err
	}
	rec.Ciphertext, rec.ADVersion, rec.Fingerprint = ct, v, fp
	return nil
}

// fingerprint is a transit HMAC over tenant, provider and secret, cut to
// 128 bits, so equal secrets within a tenant are recognizable but not
// reversible.
func (s *Service) fingerprint(ctx context.Context, tenantID string, sec secret) (string, error) {
	in, err := fingerprintInput(tenantID, sec)
	if err != nil {
		return "", err
	}
	mac, err := s.cfg.Transit.HMAC(ctx, in)
	if err != nil {
		return "", fmt.Errorf("fingerprint secret: %w", err)
	}
	return fingerprintOf(mac), nil
}

// fingerprintInput is what a secret's fingerprint is the HMAC of.
func fingerprintInput(tenantID string, sec secret) ([]byte, error) {
	plain, err := sec.plaintext()
	if err != nil {
		return nil, err
	}
	return append([]byte(tenantID+"\x00"+sec.provider+"\x00"), plain...), nil
}

// fingerprintOf renders a fingerprint HMAC, cut to 128 bits.
func fingerprintOf(mac []byte) string {
	if len(mac) > 16 {
		mac = mac[:16]
	}
	return "hmac-sha256:" + hex.EncodeToString(mac)
}

// openItem is the transit item that opens rec's ciphertext.
func (s *Service) openItem(rec store.Credential) (transit.Item, error) {
	if rec.ADVersion <= ADTenantCredential && s.cfg.RefuseLegacyAssociatedData {
		return transit.Item{}, fmt.Errorf("open secret of %s/%s: %w: %w", rec.TenantID, rec.CredentialID, transit.ErrDecrypt, errLegacyAD)
	}
	ad, err := associatedData(max(rec.ADVersion, ADTenantCredential), rec)
	if err != nil {
		return transit.Item{}, fmt.Errorf("open secret of %s/%s: %w: %w", rec.TenantID, rec.CredentialID, transit.ErrDecrypt, err)
	}
	return transit.Item{AssociatedData: ad, Ciphertext: rec.Ciphertext}, nil
}

// decrypt opens a stored record's secret with the associated data version
// it was sealed with.
func (s *Service) decrypt(ctx context.Context, rec store.Credential) (secret, error) {
	item, err := s.openItem(rec)
	if err != nil {
		return secret{}, err
	}
	plains, err := s.cfg.Transit.Decrypt(ctx, rec.TenantID, []transit.Item{item})
	if err != nil {
		return secret{}, fmt.Errorf("decrypt secret of %s/%s: %w", rec.TenantID, rec.CredentialID, err)
	}
	return s.decodeSecret(rec, plains[0])
}
