package handle

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"
)

// testKeys returns keys made of the given fill bytes, the first signing.
func testKeys(t *testing.T, fills ...byte) *Keys {
	t.Helper()
	var secrets [][]byte
	for _, f := range fills {
		secrets = append(secrets, bytes.Repeat([]byte{f}, MinKeyBytes))
	}
	k, err := NewKeys(secrets...)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestNewChecksBack(t *testing.T) {
	k := testKeys(t, 1)
	seen := map[string]bool{}
	for range 200 {
		h, hash, err := k.New()
		if err != nil {
			t.Fatal(err)
		}
		if len(h) != KeyedLength || !strings.HasPrefix(h, Prefix) || !inAlphabet(h[len(Prefix):]) {
			t.Fatalf("handle %q has the wrong shape", h)
		}
		if seen[h] {
			t.Fatal("duplicate handle")
		}
		seen[h] = true
		got, err := k.Check(h)
		if err != nil {
			t.Fatalf("Check(New()) = %v", err)
		}
		want := Checked{Hash: sha256.Sum256([]byte(h)), KeyID: k.SigningKeyID()}
		if got != want || got.Hash != hash {
			t.Fatalf("Check = %+v, want %+v (and New's hash)", got, want)
		}
	}
}

// TestForgedHandlesFail is the attacker's test: without the key, no handle
// passes, whatever checksum it carries; a CRC32 handle passes only as
// Legacy, for the caller to refuse once the legacy window is closed.
func TestForgedHandlesFail(t *testing.T) {
	server := testKeys(t, 1)
	attacker := testKeys(t, 2)
	signedByAttacker, _, err := attacker.New()
	if err != nil {
		t.Fatal(err)
	}
	body := strings.Repeat("A", bodyLen)
	tests := []struct {
		name string
		in   string
	}{
		{"signed with another key", signedByAttacker},
		{"random tag", Prefix + body + strings.Repeat("z", tagLen)},
		{"public CRC32 of a keyed-length body", Prefix + body + legacyChecksum(body) + strings.Repeat("0", tagLen-legacySumLen)},
		{"tag of the legacy scheme moved", Prefix + legacyChecksum(body) + body[legacySumLen:] + strings.Repeat("0", tagLen)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if len(tt.in) != KeyedLength {
				t.Fatalf("test input has length %d, want %d", len(tt.in), KeyedLength)
			}
			if _, err := server.Check(tt.in); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Check(forged) = %v, want ErrMalformed", err)
			}
		})
	}

	forgedLegacy := Prefix + body + legacyChecksum(body)
	got, err := server.Check(forgedLegacy)
	if err != nil || !got.Legacy || got.KeyID != "" {
		t.Fatalf("Check(CRC32 handle) = %+v, %v; want it marked Legacy", got, err)
	}
	if _, err := (Verifier{Keys: server}).Verify(t.Context(), forgedLegacy); !errors.Is(err, ErrMalformed) {
		t.Fatalf("Verify without a legacy window = %v, want ErrMalformed", err)
	}
}

func TestRotation(t *testing.T) {
	old, next := testKeys(t, 1), testKeys(t, 2)
	hOld, _, _ := old.New()
	hNext, _, _ := next.New()
	// Phase 1: the new key verifies everywhere; phase 2: it signs.
	for _, phase := range []*Keys{testKeys(t, 1, 2), testKeys(t, 2, 1)} {
		for _, h := range []string{hOld, hNext} {
			if _, err := phase.Check(h); err != nil {
				t.Errorf("keys %v: Check = %v", phase.KeyIDs(), err)
			}
		}
	}
	// Phase 3: the old key is gone, and its handles with it.
	if _, err := next.Check(hOld); !errors.Is(err, ErrMalformed) {
		t.Errorf("handle of a removed key: %v, want ErrMalformed", err)
	}
	if testKeys(t, 2, 1).SigningKeyID() != next.SigningKeyID() {
		t.Error("the first key does not sign")
	}
}

func TestCheckRejectsMalformed(t *testing.T) {
	k := testKeys(t, 1)
	valid, _, err := k.New()
	if err != nil {
		t.Fatal(err)
	}
	legacy, _, err := NewLegacy()
	if err != nil {
		t.Fatal(err)
	}
	flip := func(s string, i int) string {
		b := []byte(s)
		if b[i] == 'a' {
			b[i] = 'b'
		} else {
			b[i] = 'a'
		}
		return string(b)
	}
	tests := []struct {
		name, in string
	}{
		{"empty", ""},
		{"no prefix", "xxx_" + valid[4:]},
		{"short", valid[:len(valid)-1]},
		{"long", valid + "0"},
		{"body char changed", flip(valid, 10)},
		{"tag changed", flip(valid, len(valid)-1)},
		{"non-base62 body", valid[:10] + "-" + valid[11:]},
		{"bearer prefix left on", "Bearer " + valid},
		{"legacy body changed", flip(legacy, 10)},
		{"legacy checksum changed", flip(legacy, len(legacy)-1)},
		{"legacy non-base62 body", legacy[:10] + "-" + legacy[11:]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := k.Check(tt.in); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Check(%q) = %v, want ErrMalformed", tt.in, err)
			}
		})
	}
}

func TestFromSeed(t *testing.T) {
	k := testKeys(t, 1, 2)
	seed, err := NewSeed()
	if err != nil {
		t.Fatal(err)
	}
	h1, hash1, err := k.FromSeed(k.SigningKeyID(), seed)
	if err != nil {
		t.Fatal(err)
	}
	h2, hash2, _ := k.FromSeed(k.SigningKeyID(), seed)
	if h1 != h2 || hash1 != hash2 {
		t.Fatal("the same seed gave two handles")
	}
	if c, err := k.Check(h1); err != nil || c.Legacy {
		t.Fatalf("Check(FromSeed) = %+v, %v", c, err)
	}
	other, _ := NewSeed()
	if h3, _, _ := k.FromSeed(k.SigningKeyID(), other); h3 == h1 {
		t.Fatal("two seeds gave one handle")
	}
	// The same seed under another key is another handle: the seed alone
	// (what the store keeps) does not give the handle away.
	if h4, _, _ := k.FromSeed(k.KeyIDs()[1], seed); h4 == h1 {
		t.Fatal("two keys gave one handle for a seed")
	}
	if _, _, err := k.FromSeed("00000000", seed); !errors.Is(err, ErrMalformed) {
		t.Fatalf("FromSeed(unknown key) = %v, want ErrMalformed", err)
	}
}

func TestBinding(t *testing.T) {
	k := testKeys(t, 1)
	h, _, _ := k.New()
	b := k.Bind(h, "acme", "cred-1", "read")
	for _, tt := range []struct {
		name  string
		keys  *Keys
		h     string
		b     string
		parts []string
		want  bool
	}{
		{"same", k, h, b, []string{"acme", "cred-1", "read"}, true},
		{"rotated in second", testKeys(t, 3, 1), h, b, []string{"acme", "cred-1", "read"}, true},
		{"scope widened", k, h, b, []string{"acme", "cred-1", "read,raw"}, false},
		{"other credential", k, h, b, []string{"acme", "cred-2", "read"}, false},
		{"parts shifted", k, h, b, []string{"acmecred-1", "", "read"}, false},
		{"other handle", k, h + "x", b, []string{"acme", "cred-1", "read"}, false},
		{"other key", testKeys(t, 2), h, b, []string{"acme", "cred-1", "read"}, false},
		{"empty", k, h, "", []string{"acme", "cred-1", "read"}, false},
		{"garbage", k, h, b[:9] + "!!", []string{"acme", "cred-1", "read"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.keys.VerifyBinding(tt.h, tt.b, tt.parts...); got != tt.want {
				t.Fatalf("VerifyBinding = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestRequestHash(t *testing.T) {
	k := testKeys(t, 1)
	stored := k.RequestHash("put", "acme", "secret")
	if !k.SameRequest(stored, "put", "acme", "secret") || !testKeys(t, 2, 1).SameRequest(stored, "put", "acme", "secret") {
		t.Fatal("the same request is not recognized")
	}
	if k.SameRequest(stored, "put", "acme", "other") || k.SameRequest(stored, "put", "acmesecret", "") || testKeys(t, 2).SameRequest(stored, "put", "acme", "secret") {
		t.Fatal("another request passes as the same")
	}
	if strings.Contains(stored, "secret") {
		t.Fatal("the request hash shows its input")
	}
}

func TestParseKeys(t *testing.T) {
	k1 := "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=" // 32 bytes of 1
	k2 := "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI"  // 32 bytes of 2, unpadded
	short := "c2hvcnQ="
	for _, tt := range []struct {
		name, text string
		wantIDs    []string
		wantErr    string
	}{
		{"two keys with comments", "# signing key first\n" + k1 + "\n\n  " + k2 + "  \n", []string{testKeys(t, 1).SigningKeyID(), testKeys(t, 2).SigningKeyID()}, ""},
		{"empty", "# nothing\n", nil, "none given"},
		{"short key", k1 + "\n" + short + "\n", nil, "key 2 has 5 bytes"},
		{"duplicate", k1 + "\n" + k1 + "\n", nil, "listed twice"},
		{"not base64", k1 + "\nnot*base64*" + k1[:10] + "\n", nil, "line 2 is not base64"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParseKeys([]byte(tt.text))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseKeys = %v, want an error with %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), k1[:10]) {
					t.Fatalf("the error %q shows key material", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(k.KeyIDs(), ","); got != strings.Join(tt.wantIDs, ",") {
				t.Fatalf("key ids %s, want %s", got, strings.Join(tt.wantIDs, ","))
			}
		})
	}
}

func TestSessionIDUnrelatedToHandle(t *testing.T) {
	id, err := NewSessionID()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(id, "ses_") || len(id) != 20 {
		t.Fatalf("session id %q has wrong shape", id)
	}
}

func FuzzCheck(f *testing.F) {
	k, err := NewKeys(bytes.Repeat([]byte{1}, MinKeyBytes))
	if err != nil {
		f.Fatal(err)
	}
	// Derived, not random: the fuzzing workers compute the same one.
	valid, _, _ := k.FromSeed(k.SigningKeyID(), []byte("fuzz seed"))
	legacy, _, _ := NewLegacy()
	f.Add(valid)
	f.Add(legacy)
	f.Add("fbs_")
	f.Add("")
	f.Add(strings.Repeat("z", KeyedLength))
	f.Fuzz(func(t *testing.T, s string) {
		c, err := k.Check(s)
		if err != nil {
			return
		}
		if c.Hash != sha256.Sum256([]byte(s)) {
			t.Fatal("accepted handle with wrong hash")
		}
		if !strings.HasPrefix(s, Prefix) || (c.Legacy && len(s) != LegacyLength) || (!c.Legacy && len(s) != KeyedLength) {
			t.Fatal("accepted handle with wrong shape")
		}
		if !c.Legacy && s != valid {
			t.Fatalf("fuzzing forged a keyed handle: %q", s)
		}
	})
}
