// Package handle makes and checks session handles: 256-bit random bearer
// values with a recognizable prefix and a checksum, like modern API tokens,
// so secret scanners can find leaked handles and malformed ones are rejected
// without a store round trip. Only a handle's SHA-256 is ever stored.
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

const (
	randomBytes  = 32
	bodyLen      = 43 // base62 digits of a 256-bit number
	checksumLen  = 6  // base62 digits of a 32-bit number
	handleLength = len(Prefix) + bodyLen + checksumLen
	alphabet     = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

// ErrMalformed means the string cannot be a handle this package made.
var ErrMalformed = errors.New("malformed session handle")

// Hash is the SHA-256 of a handle: the only form in which it is stored.
type Hash [32]byte

// String returns the hash in hex.
func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// New returns a fresh handle and its hash.
func New() (string, Hash, error) {
	b := make([]byte, randomBytes)
	if _, err := rand.Read(b); err != nil {
		return "", Hash{}, err
	}
	body := base62(b, bodyLen)
	h := Prefix + body + checksum(body)
	return h, sha256.Sum256([]byte(h)), nil
}

// Parse checks a handle's shape and checksum and returns its hash.
func Parse(s string) (Hash, error) {
	if len(s) != handleLength || !strings.HasPrefix(s, Prefix) {
		return Hash{}, ErrMalformed
	}
	body, sum := s[len(Prefix):len(Prefix)+bodyLen], s[len(Prefix)+bodyLen:]
	for i := 0; i < len(body); i++ {
		if strings.IndexByte(alphabet, body[i]) < 0 {
			return Hash{}, ErrMalformed
		}
	}
	if subtle.ConstantTimeCompare([]byte(sum), []byte(checksum(body))) != 1 {
		return Hash{}, ErrMalformed
	}
	return sha256.Sum256([]byte(s)), nil
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

func checksum(body string) string {
	c := crc32.ChecksumIEEE([]byte(body))
	return base62(big.NewInt(int64(c)).Bytes(), checksumLen)
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
