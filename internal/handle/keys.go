package handle

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
)

// MinKeyBytes is the shortest key accepted: 256 bits.
const MinKeyBytes = 32

// Keys are the server secrets behind handles: the first key signs new
// handles and session bindings, every key verifies. Rotation is therefore
// three rolling restarts: add the new key second (every replica verifies
// it), move it first (replicas sign with it), and drop the old key once
// the longest session signed with it has expired (--max-session-ttl).
//
// Each key is only ever used through purpose-bound subkeys (HMAC of the key
// with a label), so a MAC made for one purpose never passes for another.
type Keys struct {
	keys []secretKey
}

type secretKey struct {
	// id names the key without revealing it: 8 hex digits of a MAC.
	id                       string
	tag, seed, bind, request []byte
}

// NewKeys returns keys from raw secrets, the signing key first. Each must
// be at least MinKeyBytes long, and no two may be equal.
func NewKeys(secrets ...[]byte) (*Keys, error) {
	if len(secrets) == 0 {
		return nil, errors.New("handle keys: none given")
	}
	k := &Keys{}
	seen := map[string]bool{}
	for i, s := range secrets {
		if len(s) < MinKeyBytes {
			return nil, fmt.Errorf("handle keys: key %d has %d bytes, want at least %d", i+1, len(s), MinKeyBytes)
		}
		sk := secretKey{
			id:      hex.EncodeToString(mac(s, "key-id")[:4]),
			tag:     mac(s, "subkey", "handle-tag"),
			seed:    mac(s, "subkey", "handle-seed"),
			bind:    mac(s, "subkey", "session-binding"),
			request: mac(s, "subkey", "request-hash"),
		}
		if seen[sk.id] {
			return nil, fmt.Errorf("handle keys: key %d is listed twice", i+1)
		}
		seen[sk.id] = true
		k.keys = append(k.keys, sk)
	}
	return k, nil
}

// GenerateKeys returns a single fresh random key: for `fleetbroker dev` and
// tests, where nothing outlives the process.
func GenerateKeys() (*Keys, error) {
	s := make([]byte, MinKeyBytes)
	if _, err := rand.Read(s); err != nil {
		return nil, err
	}
	return NewKeys(s)
}

// ParseKeys reads a key file: one key per line, base64 (standard or URL
// alphabet, padded or not) of at least MinKeyBytes random bytes; blank
// lines and lines starting with '#' are ignored. The first key signs.
//
//	head -c 32 /dev/urandom | base64
func ParseKeys(text []byte) (*Keys, error) {
	var secrets [][]byte
	for i, line := range strings.Split(string(text), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		s, err := decodeKey(line)
		if err != nil {
			// The line is a secret: name it by number only.
			return nil, fmt.Errorf("handle keys: line %d is not base64", i+1)
		}
		secrets = append(secrets, s)
	}
	return NewKeys(secrets...)
}

// LoadKeys reads the key file at path (see ParseKeys).
func LoadKeys(path string) (*Keys, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("handle keys: %w", err)
	}
	k, err := ParseKeys(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func decodeKey(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, errors.New("not base64")
}

// SigningKeyID names the key that signs new handles, for FromSeed.
func (k *Keys) SigningKeyID() string { return k.keys[0].id }

// KeyIDs names every key, signing key first (safe to log).
func (k *Keys) KeyIDs() []string {
	ids := make([]string, len(k.keys))
	for i, key := range k.keys {
		ids[i] = key.id
	}
	return ids
}

func (k *Keys) signing() *secretKey { return &k.keys[0] }

func (k *Keys) byID(id string) (*secretKey, bool) {
	for i := range k.keys {
		if k.keys[i].id == id {
			return &k.keys[i], true
		}
	}
	return nil, false
}

// Bind returns a MAC, under the signing key, of a session's contents
// together with its handle: stored beside the session, it lets the
// credentials service refuse a session record that anyone without the key
// wrote or edited (a Redis writer cannot plant or widen a session). parts
// must be given in the same order to VerifyBinding.
func (k *Keys) Bind(h string, parts ...string) string {
	key := k.signing()
	return key.id + "." + base64.RawURLEncoding.EncodeToString(mac(key.bind, "session-binding", append([]string{h}, parts...)...))
}

// VerifyBinding reports whether binding is Bind(h, parts...) under any of
// the keys.
func (k *Keys) VerifyBinding(h, binding string, parts ...string) bool {
	id, enc, ok := strings.Cut(binding, ".")
	if !ok {
		return false
	}
	key, ok := k.byID(id)
	if !ok {
		return false
	}
	got, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		return false
	}
	return hmac.Equal(got, mac(key.bind, "session-binding", append([]string{h}, parts...)...))
}

// RequestHash returns a keyed hash of a request's content, stored with the
// first result of an idempotent request so that a reuse of its request id
// for another request is noticed. It is keyed because requests carry
// secrets, and a plain hash of a weak secret could be reversed by whoever
// reads the store.
func (k *Keys) RequestHash(parts ...string) string {
	key := k.signing()
	return key.id + "." + base64.RawURLEncoding.EncodeToString(mac(key.request, "request", parts...))
}

// SameRequest reports whether stored is RequestHash(parts...) under any of
// the keys (a retry may span a key rotation).
func (k *Keys) SameRequest(stored string, parts ...string) bool {
	id, _, ok := strings.Cut(stored, ".")
	if !ok {
		return false
	}
	key, ok := k.byID(id)
	if !ok {
		return false
	}
	want := id + "." + base64.RawURLEncoding.EncodeToString(mac(key.request, "request", parts...))
	return subtle.ConstantTimeCompare([]byte(stored), []byte(want)) == 1
}

// mac is HMAC-SHA256 under key of a label and parts, each length-prefixed so
// that no two different lists encode alike.
func mac(key []byte, label string, parts ...string) []byte {
	m := hmac.New(sha256.New, key)
	var n [8]byte
	for _, p := range append([]string{"fleetbroker/" + label}, parts...) {
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		m.Write(n[:])
		m.Write([]byte(p))
	}
	return m.Sum(nil)
}
