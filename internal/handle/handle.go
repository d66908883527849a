// Package handle makes and checks session handles: 256-bit bearer values
// with a recognizable prefix and a checksum, like modern API tokens, so
// secret scanners can find leaked handles and forged ones are refused
// without a store round trip.
//
// The checksum is keyed: a truncated HMAC-SHA256 under a server secret that
// the credentials service and the gateway share (Keys, loaded from
// --handle-key-file). Nobody without the key can make a handle that passes
// Check, so a random or planted handle costs its sender, not the broker.
// Handles made before keys existed carry a public CRC32 instead; Check still
// recognizes them (Checked.Legacy) so that they keep working until they
// expire, and LegacyWindow says when to stop accepting them.
//
// Only a handle's SHA-256 (Hash) is ever stored; this package never logs a
// handle, a key, or anything derived from a key in an error.
package handle

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"math/big"
	"strings"
)

// Prefix starts every handle ("fleetbroker session").
const Prefix = "fbs_"

// A handle is Prefix, a body of 43 base62 digits (256 bits) and a checksum.
// The length says which checksum it carries: 22 base62 digits of a 128-bit
// keyed MAC (KeyedLength), or, in handles made before keys existed, 6 base62
// digits of a CRC32 (LegacyLength).
const (
	randomBytes  = 32
	bodyLen      = 43 // base62 digits of a 256-bit number
	tagBytes     = 16
	tagLen       = 22 // base62 digits of a 128-bit number
	legacySumLen = 6  // base62 digits of a 32-bit number
	// KeyedLength is the length of a handle with a keyed checksum.
	KeyedLength = len(Prefix) + bodyLen + tagLen
	// LegacyLength is the length of a handle with a CRC32 checksum.
	LegacyLength = len(Prefix) + bodyLen + legacySumLen
	alphabet     = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

// ErrMalformed means the string is not a handle these keys made (nor a
// legacy handle): wrong shape, wrong checksum, or signed by an unknown key.
var ErrMalformed = errors.New("malformed session handle")

// Hash is the SHA-256 of a handle: the only form in which it is stored.
type Hash [32]byte

// String returns the hash in hex.
func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// HashOf returns the hash of s, without checking that s is a handle: for
// code that already checked it and keeps only the hash.
func HashOf(s string) Hash { return sha256.Sum256([]byte(s)) }

// Checked is a handle that passed Check.
type Checked struct {
	Hash Hash
	// Legacy marks a handle with a CRC32 checksum, made before keyed
	// checksums: anyone can make one that passes, so accept it only while
	// the LegacyWindow is open.
	Legacy bool
	// KeyID names the key whose MAC the handle carries ("" when Legacy).
	KeyID string
}

// New returns a fresh handle signed with the signing key, and its hash.
func (k *Keys) New() (string, Hash, error) {
	b := make([]byte, randomBytes)
	if _, err := rand.Read(b); err != nil {
		return "", Hash{}, err
	}
	return k.assemble(k.signing(), base62(b, bodyLen))
}

// NewSeed returns a fresh random seed for FromSeed.
func NewSeed() ([]byte, error) {
	seed := make([]byte, randomBytes)
	_, err := rand.Read(seed)
	return seed, err
}

// FromSeed returns the handle that the key keyID derives from seed: the
// same key and seed always give the same handle, and nobody without the key
// can compute it. It lets an idempotent IssueSession hand a retried request
// the handle of the first one without storing the handle: the seed is
// stored, the handle is derived again. Use SigningKeyID for a new seed; an
// unknown keyID (a key removed since) is ErrMalformed.
func (k *Keys) FromSeed(keyID string, seed []byte) (string, Hash, error) {
	key, ok := k.byID(keyID)
	if !ok {
		return "", Hash{}, ErrMalformed
	}
	body := mac(key.seed, "handle-body", string(seed))
	return k.assemble(key, base62(body, bodyLen))
}

// LegacyFromSeed is FromSeed for a legacy (CRC32) handle: what a service
// that still issues legacy handles (--write-legacy-formats) derives for an
// idempotent IssueSession.
func (k *Keys) LegacyFromSeed(keyID string, seed []byte) (string, Hash, error) {
	key, ok := k.byID(keyID)
	if !ok {
		return "", Hash{}, ErrMalformed
	}
	body := base62(mac(key.seed, "legacy-handle-body", string(seed)), bodyLen)
	h := Prefix + body + legacyChecksum(body)
	return h, sha256.Sum256([]byte(h)), nil
}

func (k *Keys) assemble(key *secretKey, body string) (string, Hash, error) {
	h := Prefix + body + keyedTag(key, body)
	return h, sha256.Sum256([]byte(h)), nil
}

// Check checks a handle's shape and checksum and returns its hash. A keyed
// handle must carry the MAC of one of the keys; a legacy handle its CRC32
// (see Checked.Legacy).
func (k *Keys) Check(s string) (Checked, error) {
	if !strings.HasPrefix(s, Prefix) {
		return Checked{}, ErrMalformed
	}
	switch len(s) {
	case KeyedLength:
		body, tag := s[len(Prefix):len(Prefix)+bodyLen], s[len(Prefix)+bodyLen:]
		if !inAlphabet(body) {
			return Checked{}, ErrMalformed
		}
		// Every key is tried, each in constant time, so a rotated-out
		// key's handles keep working while it is listed.
		for i := range k.keys {
			key := &k.keys[i]
			if subtle.ConstantTimeCompare([]byte(tag), []byte(keyedTag(key, body))) == 1 {
				return Checked{Hash: sha256.Sum256([]byte(s)), KeyID: key.id}, nil
			}
		}
	case LegacyLength:
		body, sum := s[len(Prefix):len(Prefix)+bodyLen], s[len(Prefix)+bodyLen:]
		if inAlphabet(body) && subtle.ConstantTimeCompare([]byte(sum), []byte(legacyChecksum(body))) == 1 {
			return Checked{Hash: sha256.Sum256([]byte(s)), Legacy: true}, nil
		}
	}
	return Checked{}, ErrMalformed
}

// WellFormed reports whether s has the shape of a handle (prefix, length,
// alphabet) without checking its checksum: for code that has no keys and
// only needs to refuse what cannot be a handle at all.
func WellFormed(s string) bool {
	if !strings.HasPrefix(s, Prefix) || (len(s) != KeyedLength && len(s) != LegacyLength) {
		return false
	}
	return inAlphabet(s[len(Prefix):])
}

// NewLegacy returns a fresh handle with the CRC32 checksum of the release
// before keyed checksums, for a credentials service that must still issue
// handles the older release's replicas accept (--write-legacy-formats
// during an upgrade).
func NewLegacy() (string, Hash, error) {
	b := make([]byte, randomBytes)
	if _, err := rand.Read(b); err != nil {
		return "", Hash{}, err
	}
	body := base62(b, bodyLen)
	h := Prefix + body + legacyChecksum(body)
	return h, sha256.Sum256([]byte(h)), nil
}

// NewSessionID returns a random identifier for a session that is safe to
// log: it is not derived from the handle.
func NewSessionID() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "ses_" + hex.EncodeToString(b), nil
}

func keyedTag(key *secretKey, body string) string {
	return base62(mac(key.tag, "handle-tag", Prefix+body)[:tagBytes], tagLen)
}

func legacyChecksum(body string) string {
	c := crc32.ChecksumIEEE([]byte(body))
	return base62(big.NewInt(int64(c)).Bytes(), legacySumLen)
}

func inAlphabet(s string) bool {
	for i := 0; i < len(s); i++ {
		if strings.IndexByte(alphabet, s[i]) < 0 {
			return false
		}
	}
	return true
}

// base62 encodes b as a big-endian number in exactly width digits.
func base62(b []byte, width int) string {
	n := new(big.Int).SetBytes(b)
	out := make([]byte, width)
	base, rem := big.NewInt(62), new(big.Int)
	for i := width - 1; i >= 0; i-- {
		n.DivMod(n, base, rem)
		out[i] = alphabet[rem.Int64()]
	}
	return string(out)
}
