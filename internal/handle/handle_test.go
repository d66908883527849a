package handle

import (
	"crypto/sha256"
	"strings"
	"testing"
)

func TestNewParsesBack(t *testing.T) {
	seen := map[string]bool{}
	for range 200 {
		h, hash, err := New()
		if err != nil {
			t.Fatal(err)
		}
		if len(h) != handleLength || !strings.HasPrefix(h, Prefix) {
			t.Fatalf("handle %q has wrong shape", h)
		}
		if seen[h] {
			t.Fatal("duplicate handle")
		}
		seen[h] = true
		got, err := Parse(h)
		if err != nil {
			t.Fatalf("Parse(New()) = %v", err)
		}
		if got != hash || got != sha256.Sum256([]byte(h)) {
			t.Fatal("Parse returned a different hash than New")
		}
	}
}

func TestParseRejectsMalformed(t *testing.T) {
	valid, _, err := New()
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
		{"checksum changed", flip(valid, len(valid)-1)},
		{"non-base62 body", valid[:10] + "-" + valid[11:]},
		{"bearer prefix left on", "Bearer " + valid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Parse(tt.in); err != ErrMalformed {
				t.Fatalf("Parse(%q) = %v, want ErrMalformed", tt.in, err)
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

func FuzzParse(f *testing.F) {
	valid, _, _ := New()
	f.Add(valid)
	f.Add("fbs_")
	f.Add("")
	f.Add(strings.Repeat("z", handleLength))
	f.Fuzz(func(t *testing.T, s string) {
		hash, err := Parse(s)
		if err != nil {
			return
		}
		if hash != sha256.Sum256([]byte(s)) {
			t.Fatal("accepted handle with wrong hash")
		}
		if !strings.HasPrefix(s, Prefix) || len(s) != handleLength {
			t.Fatal("accepted handle with wrong shape")
		}
	})
}
