// Package transittest is the conformance suite every transit.Transit
// implementation must pass, so that the dev Keyring behaves like Vault:
// batch round trips, tenant and associated-data binding, tamper detection,
// rotation and rewrap, data keys, HMAC, and the error classes, with the
// extra rule that no error text ever contains a plaintext or a ciphertext.
package transittest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// canary is a recognisable plaintext; if it shows up in an error text,
// something leaks. It looks like a Wialon token on purpose.
const canary = "CANARY-wialon-token-0123456789abcdef0123456789abcdef0123456789abcdefXYZ"

// Run runs the suite. newTransit must return an implementation with its own
// key (so rotating it does not disturb other tests); it is called once per
// subtest, and subtests run in parallel.
func Run(t *testing.T, newTransit func(t *testing.T) transit.Rotatable) {
	tests := []struct {
		name string
		fn   func(t *testing.T, tr transit.Rotatable)
	}{
		{"RoundTripBatch", testRoundTripBatch},
		{"EmptyBatch", testEmptyBatch},
		{"DecryptFailures", testDecryptFailures},
		{"FailedItemSpoilsBatch", testFailedItemSpoilsBatch},
		{"RotateAndRewrap", testRotateAndRewrap},
		{"RewrapFailures", testRewrapFailures},
		{"DataKey", testDataKey},
		{"HMAC", testHMAC},
		{"EmptyTenant", testEmptyTenant},
		{"Probes", testProbes},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, newTransit(t))
		})
	}
}

// sample returns items with distinct plaintexts and associated data, like
// the credentials service stores them: AAD = tenant + credential id.
func sample(tenant string) []transit.Item {
	binary := make([]byte, 256)
	for i := range binary {
		binary[i] = byte(i)
	}
	return []transit.Item{
		{Plaintext: []byte(canary), AssociatedData: []byte(tenant + "/cred-1")},
		{Plaintext: binary, AssociatedData: []byte(tenant + "/cred-2")},
		{Plaintext: []byte(`{"acctId":12345,"secret":"s3cr3t"}`), AssociatedData: []byte(tenant + "/cred-3")},
		{Plaintext: []byte("x"), AssociatedData: nil},
		{Plaintext: []byte{}, AssociatedData: []byte(tenant + "/cred-5")},
	}
}

// encryptSample encrypts sample(tenant) and returns the items with their
// ciphertexts filled in.
func encryptSample(t *testing.T, tr transit.Transit, tenant string) []transit.Item {
	t.Helper()
	items := sample(tenant)
	cts, err := tr.Encrypt(t.Context(), tenant, items)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if len(cts) != len(items) {
		t.Fatalf("Encrypt returned %d ciphertexts for %d items", len(cts), len(items))
	}
	for i := range items {
		items[i].Ciphertext = cts[i]
	}
	return items
}

// forDecrypt strips plaintexts, so a decrypt cannot accidentally pass by
// echoing its input.
func forDecrypt(items []transit.Item) []transit.Item {
	out := make([]transit.Item, len(items))
	for i, it := range items {
		out[i] = transit.Item{Ciphertext: it.Ciphertext, AssociatedData: it.AssociatedData}
	}
	return out
}

func testRoundTripBatch(t *testing.T, tr transit.Rotatable) {
	const tenant = "tenant-a"
	items := encryptSample(t, tr, tenant)
	seen := map[string]bool{}
	for i, it := range items {
		if it.Ciphertext == "" || seen[it.Ciphertext] {
			t.Errorf("item %d: empty or repeated ciphertext %q", i, it.Ciphertext)
		}
		seen[it.Ciphertext] = true
		// Only long plaintexts: a short one can occur in base64 by chance.
		if len(it.Plaintext) >= 16 && strings.Contains(it.Ciphertext, string(it.Plaintext)) {
			t.Errorf("item %d: ciphertext contains the plaintext", i)
		}
		if v := keyVersion(t, it.Ciphertext); v != 1 {
			t.Errorf("item %d: key version %d, want 1", i, v)
		}
	}

	got, err := tr.Decrypt(t.Context(), tenant, forDecrypt(items))
	if err != nil {
		t.Fatalf("Decrypt: %v", err)
	}
	if len(got) != len(items) {
		t.Fatalf("Decrypt returned %d plaintexts for %d items", len(got), len(items))
	}
	for i, it := range items {
		if !bytes.Equal(got[i], it.Plaintext) {
			t.Errorf("item %d: decrypted %q, want %q", i, got[i], it.Plaintext)
		}
	}

	// Encryption is randomized: the same plaintext twice gives two
	// ciphertexts.
	again, err := tr.Encrypt(t.Context(), tenant, items[:1])
	if err != nil {
		t.Fatalf("Encrypt again: %v", err)
	}
	if again[0] == items[0].Ciphertext {
		t.Error("encrypting the same plaintext twice gave the same ciphertext")
	}
}

func testEmptyBatch(t *testing.T, tr transit.Rotatable) {
	ctx := t.Context()
	for _, items := range [][]transit.Item{nil, {}} {
		cts, err := tr.Encrypt(ctx, "tenant-a", items)
		if err != nil || len(cts) != 0 {
			t.Errorf("Encrypt(%#v) = %q, %v; want empty, nil", items, cts, err)
		}
		pts, err := tr.Decrypt(ctx, "tenant-a", items)
		if err != nil || len(pts) != 0 {
			t.Errorf("Decrypt(%#v) = %q, %v; want empty, nil", items, pts, err)
		}
		cts, err = tr.Rewrap(ctx, "tenant-a", items)
		if err != nil || len(cts) != 0 {
			t.Errorf("Rewrap(%#v) = %q, %v; want empty, nil", items, cts, err)
		}
	}
}

// tamper flips one character in the middle of the ciphertext's base64 body.
func tamper(ct string) string {
	i := strings.LastIndex(ct, ":") + 1 + (len(ct)-strings.LastIndex(ct, ":"))/2
	b := []byte(ct)
	if b[i] == 'A' {
		b[i] = 'B'
	} else {
		b[i] = 'A'
	}
	return string(b)
}

// withVersion replaces the "vN" field of a "<prefix>:vN:<body>" ciphertext.
func withVersion(ct string, v int) string {
	parts := strings.SplitN(ct, ":", 3)
	return parts[0] + ":v" + strconv.Itoa(v) + ":" + parts[2]
}

func testDecryptFailures(t *testing.T, tr transit.Rotatable) {
	const tenant = "tenant-a"
	good := encryptSample(t, tr, tenant)[0] // the canary
	tests := []struct {
		name       string
		tenant     string
		ciphertext string
		aad        []byte
	}{
		{"other tenant", "tenant-b", good.Ciphertext, good.AssociatedData},
		{"other credential id in AAD", tenant, good.Ciphertext, []byte(tenant + "/cred-2")},
		{"other tenant in AAD", tenant, good.Ciphertext, []byte("tenant-b/cred-1")},
		{"no AAD", tenant, good.Ciphertext, nil},
		{"tampered body", tenant, tamper(good.Ciphertext), good.AssociatedData},
		{"truncated", tenant, good.Ciphertext[:len(good.Ciphertext)-8], good.AssociatedData},
		{"unknown version", tenant, withVersion(good.Ciphertext, 99), good.AssociatedData},
		{"not a ciphertext", tenant, "definitely not a ciphertext", good.AssociatedData},
		{"empty", tenant, "", good.AssociatedData},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			items := []transit.Item{{Ciphertext: tc.ciphertext, AssociatedData: tc.aad}}
			pts, err := tr.Decrypt(t.Context(), tc.tenant, items)
			checkErr(t, err, transit.ErrDecrypt, good.Ciphertext)
			if pts != nil {
				t.Errorf("Decrypt returned plaintexts %q along with an error", pts)
			}
		})
	}
}

// A bad item fails the whole batch, and no plaintext of the good items is
// handed out.
func testFailedItemSpoilsBatch(t *testing.T, tr transit.Rotatable) {
	const tenant = "tenant-a"
	items := forDecrypt(encryptSample(t, tr, tenant))
	items[2].AssociatedData = []byte(tenant + "/cred-other")
	pts, err := tr.Decrypt(t.Context(), tenant, items)
	checkErr(t, err, transit.ErrDecrypt, items[0].Ciphertext)
	if pts != nil {
		t.Errorf("Decrypt returned plaintexts along with an error")
	}
}

func testRotateAndRewrap(t *testing.T, tr transit.Rotatable) {
	const tenant = "tenant-a"
	ctx := t.Context()
	old := encryptSample(t, tr, tenant)
	if err := tr.RotateKey(ctx); err != nil {
		t.Fatalf("RotateKey: %v", err)
	}

	// Old ciphertexts still decrypt.
	got, err := tr.Decrypt(ctx, tenant, forDecrypt(old))
	if err != nil {
		t.Fatalf("Decrypt after rotation: %v", err)
	}
	assertPlaintexts(t, got, old)

	// New encryptions use version 2.
	fresh, err := tr.Encrypt(ctx, tenant, old[:1])
	if err != nil {
		t.Fatalf("Encrypt after rotation: %v", err)
	}
	if v := keyVersion(t, fresh[0]); v != 2 {
		t.Errorf("new ciphertext has key version %d, want 2", v)
	}

	// Rewrap moves everything to version 2, and the result still decrypts.
	rewrapped, err := tr.Rewrap(ctx, tenant, forDecrypt(old))
	if err != nil {
		t.Fatalf("Rewrap: %v", err)
	}
	if len(rewrapped) != len(old) {
		t.Fatalf("Rewrap returned %d ciphertexts for %d items", len(rewrapped), len(old))
	}
	next := make([]transit.Item, len(old))
	for i, it := range old {
		if v := keyVersion(t, rewrapped[i]); v != 2 {
			t.Errorf("item %d: rewrapped key version %d, want 2", i, v)
		}
		if rewrapped[i] == it.Ciphertext {
			t.Errorf("item %d: Rewrap returned the old ciphertext", i)
		}
		next[i] = transit.Item{Ciphertext: rewrapped[i], AssociatedData: it.AssociatedData, Plaintext: it.Plaintext}
	}
	got, err = tr.Decrypt(ctx, tenant, forDecrypt(next))
	if err != nil {
		t.Fatalf("Decrypt rewrapped: %v", err)
	}
	assertPlaintexts(t, got, old)

	// Rewrap keeps the AAD binding: the new ciphertext does not open under
	// another credential id or tenant.
	moved := []transit.Item{{Ciphertext: next[0].Ciphertext, AssociatedData: []byte(tenant + "/cred-2")}}
	_, err = tr.Decrypt(ctx, tenant, moved)
	checkErr(t, err, transit.ErrDecrypt, next[0].Ciphertext)
	_, err = tr.Decrypt(ctx, "tenant-b", forDecrypt(next[:1]))
	checkErr(t, err, transit.ErrDecrypt, next[0].Ciphertext)
}

func testRewrapFailures(t *testing.T, tr transit.Rotatable) {
	const tenant = "tenant-a"
	good := encryptSample(t, tr, tenant)[0]
	if err := tr.RotateKey(t.Context()); err != nil {
		t.Fatalf("RotateKey: %v", err)
	}
	tests := []struct {
		name   string
		tenant string
		item   transit.Item
	}{
		{"other tenant", "tenant-b", transit.Item{Ciphertext: good.Ciphertext, AssociatedData: good.AssociatedData}},
		{"other AAD", tenant, transit.Item{Ciphertext: good.Ciphertext, AssociatedData: []byte(tenant + "/cred-2")}},
		{"tampered", tenant, transit.Item{Ciphertext: tamper(good.Ciphertext), AssociatedData: good.AssociatedData}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cts, err := tr.Rewrap(t.Context(), tc.tenant, []transit.Item{tc.item})
			checkErr(t, err, transit.ErrDecrypt, good.Ciphertext)
			if cts != nil {
				t.Errorf("Rewrap returned ciphertexts %q along with an error", cts)
			}
		})
	}
}

func testDataKey(t *testing.T, tr transit.Rotatable) {
	const tenant = "tenant-a"
	ctx := t.Context()
	dk, err := tr.GenerateDataKey(ctx, tenant)
	if err != nil {
		t.Fatalf("GenerateDataKey: %v", err)
	}
	if len(dk.Plaintext) != 32 {
		t.Fatalf("data key is %d bytes, want 32", len(dk.Plaintext))
	}
	if dk.Wrapped == "" || strings.Contains(dk.Wrapped, base64.StdEncoding.EncodeToString(dk.Plaintext)) {
		t.Fatalf("wrapped key %q is empty or contains the key", dk.Wrapped)
	}
	other, err := tr.GenerateDataKey(ctx, tenant)
	if err != nil {
		t.Fatalf("GenerateDataKey again: %v", err)
	}
	if bytes.Equal(other.Plaintext, dk.Plaintext) {
		t.Error("two data keys are equal")
	}

	got, err := tr.UnwrapDataKey(ctx, tenant, dk.Wrapped)
	if err != nil {
		t.Fatalf("UnwrapDataKey: %v", err)
	}
	if !bytes.Equal(got, dk.Plaintext) {
		t.Error("unwrapped key differs from the generated one")
	}

	_, err = tr.UnwrapDataKey(ctx, "tenant-b", dk.Wrapped)
	checkErr(t, err, transit.ErrDecrypt, dk.Wrapped, string(dk.Plaintext), base64.StdEncoding.EncodeToString(dk.Plaintext))
	_, err = tr.UnwrapDataKey(ctx, tenant, tamper(dk.Wrapped))
	checkErr(t, err, transit.ErrDecrypt, dk.Wrapped, string(dk.Plaintext), base64.StdEncoding.EncodeToString(dk.Plaintext))

	// A key wrapped before a rotation still unwraps after it.
	if err := tr.RotateKey(ctx); err != nil {
		t.Fatalf("RotateKey: %v", err)
	}
	got, err = tr.UnwrapDataKey(ctx, tenant, dk.Wrapped)
	if err != nil || !bytes.Equal(got, dk.Plaintext) {
		t.Errorf("UnwrapDataKey after rotation: equal=%t, err=%v", bytes.Equal(got, dk.Plaintext), err)
	}
}

func testHMAC(t *testing.T, tr transit.Rotatable) {
	ctx := t.Context()
	mac := func(data string) []byte {
		t.Helper()
		m, err := tr.HMAC(ctx, []byte(data))
		if err != nil {
			t.Fatalf("HMAC(%q): %v", data, err)
		}
		return m
	}
	a1, a2, b := mac("handle-a"), mac("handle-a"), mac("handle-b")
	if len(a1) != sha256.Size {
		t.Fatalf("MAC is %d bytes, want %d", len(a1), sha256.Size)
	}
	if !bytes.Equal(a1, a2) {
		t.Error("HMAC of the same data differs between calls")
	}
	if bytes.Equal(a1, b) {
		t.Error("HMAC of different data is equal")
	}
	if plain := sha256.Sum256([]byte("handle-a")); bytes.Equal(a1, plain[:]) {
		t.Error("HMAC is an unkeyed SHA-256")
	}
	if len(mac("")) != sha256.Size {
		t.Error("HMAC of empty data has the wrong size")
	}

	// Like Vault, HMAC uses the newest key version: a rotation changes the
	// MAC of the same data. Callers that store MACs must know this.
	if err := tr.RotateKey(ctx); err != nil {
		t.Fatalf("RotateKey: %v", err)
	}
	if rotated := mac("handle-a"); bytes.Equal(rotated, a1) {
		t.Error("HMAC did not change after RotateKey")
	}
}

func testEmptyTenant(t *testing.T, tr transit.Rotatable) {
	ct := encryptSample(t, tr, "tenant-a")[0].Ciphertext
	items := []transit.Item{{Plaintext: []byte(canary), Ciphertext: ct, AssociatedData: []byte("tenant-a/cred-1")}}
	tests := []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"Encrypt", func(ctx context.Context) error { _, err := tr.Encrypt(ctx, "", items); return err }},
		{"Encrypt empty batch", func(ctx context.Context) error { _, err := tr.Encrypt(ctx, "", nil); return err }},
		{"Decrypt", func(ctx context.Context) error { _, err := tr.Decrypt(ctx, "", items); return err }},
		{"Rewrap", func(ctx context.Context) error { _, err := tr.Rewrap(ctx, "", items); return err }},
		{"GenerateDataKey", func(ctx context.Context) error { _, err := tr.GenerateDataKey(ctx, ""); return err }},
		{"UnwrapDataKey", func(ctx context.Context) error { _, err := tr.UnwrapDataKey(ctx, "", ct); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			checkErr(t, tc.call(t.Context()), transit.ErrInvalid, ct)
		})
	}
}

// checkErr asserts that err is target and that its text leaks neither the
// canary (raw or base64) nor any of the given secrets (ciphertexts, keys).
func checkErr(t *testing.T, err, target error, secrets ...string) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error = %v, want %v", err, target)
	}
	text := err.Error()
	for _, s := range append(secrets, canary, base64.StdEncoding.EncodeToString([]byte(canary))) {
		if s != "" && strings.Contains(text, s) {
			t.Errorf("error text %q contains a secret", text)
		}
		// A ciphertext's body alone is just as bad as the whole string.
		if _, body, ok := cutBody(s); ok && len(body) >= 16 && strings.Contains(text, body) {
			t.Errorf("error text %q contains a ciphertext body", text)
		}
	}
}

// cutBody returns the base64 part of a "<prefix>:vN:<body>" ciphertext.
func cutBody(ct string) (prefix, body string, ok bool) {
	parts := strings.SplitN(ct, ":", 3)
	if len(parts) != 3 {
		return "", "", false
	}
	return parts[0], parts[2], true
}

// keyVersion parses N from "<prefix>:vN:<body>".
func keyVersion(t *testing.T, ct string) int {
	t.Helper()
	parts := strings.SplitN(ct, ":", 3)
	if len(parts) != 3 || !strings.HasPrefix(parts[1], "v") {
		t.Fatalf("ciphertext %q is not <prefix>:vN:<body>", ct)
	}
	v, err := strconv.Atoi(parts[1][1:])
	if err != nil {
		t.Fatalf("ciphertext %q: bad version: %v", ct, err)
	}
	return v
}

func assertPlaintexts(t *testing.T, got [][]byte, want []transit.Item) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d plaintexts, want %d", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i].Plaintext) {
			t.Errorf("item %d: got %q, want %q", i, got[i], want[i].Plaintext)
		}
	}
}

// testProbes: the readiness probes pass on a working key.
func testProbes(t *testing.T, tr transit.Rotatable) {
	for name, probe := range map[string]func(context.Context, transit.Transit) error{
		"ProbeEncrypt": transit.ProbeEncrypt, "ProbeDataKey": transit.ProbeDataKey,
	} {
		if err := probe(t.Context(), tr); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}
