// Package store keeps credential records (ciphertext plus metadata) and
// session records for the credentials service. It never sees plaintext
// secrets or handles: credentials arrive already encrypted and sessions are
// keyed by the SHA-256 of the handle.
//
// Redis is the production implementation (through go-redis's UniversalClient:
// single node, Sentinel or Cluster). `fleetbroker dev` runs the same code
// against an in-process Redis-protocol server. One conformance suite
// (storetest) holds both to the same behaviour.
package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"time"
)

// Provider names as stored.
const (
	ProviderWialon  = "wialon"
	ProviderFleetUp = "fleetup"
)

// Validation states as stored.
const (
	ValidationNotValidated = "not_validated"
	ValidationValid        = "valid"
	ValidationRejected     = "rejected"
)

// Credential is one stored credential: the encrypted secret and its metadata.
type Credential struct {
	TenantID     string
	CredentialID string
	Provider     string
	// Version starts at 1; Put of an existing credential sets it to the old
	// version plus 1, whatever the caller put here.
	Version int64
	// Generation identifies the exact secret stored: a random id set on
	// every Put and never reused, so anything derived from a secret (a
	// cached upstream session) can be bound to it. Unlike Version it does
	// not restart when a credential is deleted and created again.
	Generation string
	// Ciphertext is the transit ciphertext of the secret.
	Ciphertext string
	// Fingerprint is a keyed, non-reversible fingerprint of the secret.
	Fingerprint       string
	BaseURL           string
	FleetUpAccountID  int64
	Labels            map[string]string
	CreateTime        time.Time // kept from the first Put on replace
	UpdateTime        time.Time
	ValidateTime      time.Time // zero if never validated
	ValidationState   string
	ValidationMessage string
	UpstreamUser      string
	// TokenExpireTime is when the stored token stops working, when known
	// (zero: unlimited or unknown). It belongs to the secret: every Put
	// sets it, and a validation leaves it alone.
	TokenExpireTime time.Time
}

// NewGeneration returns a fresh credential generation id: 128 random bits,
// so two Puts never share one.
func NewGeneration() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "g" + hex.EncodeToString(b), nil
}

// Session is one issued session handle, stored under the handle's SHA-256.
type Session struct {
	// HandleHash is the SHA-256 of the handle.
	HandleHash   [32]byte
	SessionID    string
	TenantID     string
	CredentialID string
	Scopes       []string
	CreateTime   time.Time
	ExpireTime   time.Time
}

// Validation is the outcome of asking the provider about a secret.
type Validation struct {
	State        string
	Message      string
	UpstreamUser string
	Time         time.Time
}

var (
	// ErrNotFound: no such credential or session (expired sessions are not found).
	ErrNotFound = errors.New("store: not found")
	// ErrVersionConflict: the credential changed since it was read.
	ErrVersionConflict = errors.New("store: version conflict")
	// ErrInvalidArgument: an id the store cannot key safely (empty, or with
	// ':', '{' or '}'), a page size ≤ 0, or a page token it did not make.
	// The service validates ids first, so outside of page tokens this
	// signals a bug.
	ErrInvalidArgument = errors.New("store: invalid argument")
	// ErrUnavailable: the backing store could not be reached.
	ErrUnavailable = errors.New("store: unavailable")
)

// Store is the persistence the credentials service needs.
type Store interface {
	// PutCredential creates c or replaces the stored credential with the
	// same tenant and id, atomically: on replace, Version becomes the old
	// version + 1 and CreateTime is kept; every Put stores a new
	// Generation (a fresh one when c has none). It returns the stored
	// record and whether it was created.
	PutCredential(ctx context.Context, c Credential) (Credential, bool, error)
	GetCredential(ctx context.Context, tenantID, credentialID string) (Credential, error)
	// ListCredentials pages through a tenant's credentials ordered by id.
	// pageToken is opaque ("" for the first page); the returned token is ""
	// on the last page.
	ListCredentials(ctx context.Context, tenantID string, pageSize int, pageToken string) ([]Credential, string, error)
	// DeleteCredential deletes the credential and revokes all of its
	// sessions; it returns how many live sessions were revoked.
	DeleteCredential(ctx context.Context, tenantID, credentialID string) (int64, error)
	// SetValidation records a validation outcome if the credential is still
	// at version; otherwise ErrVersionConflict.
	SetValidation(ctx context.Context, tenantID, credentialID string, version int64, v Validation) (Credential, error)
	// UpdateCiphertext replaces the ciphertext of the credential at version
	// (after a transit rewrap) without bumping the version; ErrVersionConflict
	// if the credential changed meanwhile.
	UpdateCiphertext(ctx context.Context, tenantID, credentialID string, version int64, ciphertext string) error
	// ForEachCredential calls fn for every credential of every tenant (rewrap).
	ForEachCredential(ctx context.Context, fn func(Credential) error) error

	// CreateSession stores s with a TTL until s.ExpireTime and adds it to
	// its credential's session set; ErrNotFound if the credential does not exist.
	CreateSession(ctx context.Context, s Session) error
	// GetSession returns the live session stored under handleHash.
	GetSession(ctx context.Context, handleHash [32]byte) (Session, error)
	// DeleteSession revokes the session stored under handleHash.
	DeleteSession(ctx context.Context, handleHash [32]byte) (Session, error)
}
