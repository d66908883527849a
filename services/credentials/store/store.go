// Package store keeps credential records (ciphertext plus metadata) and
// session records for the credentials service. It never sees plaintext
// secrets or handles: credentials arrive already encrypted and sessions are
// keyed by the SHA-256 of the handle.
//
// Every write is idempotent under retry: PutCredential, DeleteCredential
// and CreateSession carry a Request whose first result is kept for a
// window, so a second run of the same request (a client's retry, or the
// Redis client's after a lost reply) writes nothing and returns the first
// result; the other writes set values or compare versions, so running them
// twice changes nothing.
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
	// Ciphertext is the transit ciphertext of the secret. Empty in the
	// first result of a replayed PutCredential (see Request).
	Ciphertext string
	// ADVersion is the version of the associated data Ciphertext was sealed
	// with (the service defines them). 0 is stored as 1: records written
	// before the field existed were sealed with version 1.
	ADVersion int
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
	// LastUsedTime is when the service last logged in upstream with the
	// secret (zero if never since it was stored): the keep-alive keeps
	// secrets the upstream deletes when unused (Wialon: 100 days) alive.
	LastUsedTime time.Time
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
	// Binding is a keyed MAC of the session's contents and its handle,
	// made by the service, so a record that someone without the key wrote
	// or edited is refused. Empty in records written before bindings.
	Binding string
}

// Request makes a write idempotent. ID names the caller's request (AIP-155
// request_id); Hash is a fingerprint of its content. The first run of an ID
// stores the result beside the write for RequestWindow; a later run with
// the same ID writes nothing and returns that first result, marked
// Replayed, with the Hash it was stored with, for the caller to refuse a
// reuse of the ID for another request. An empty ID still makes the one
// call idempotent (the store picks an ID kept for a minute), against the
// Redis client retrying a write whose reply was lost.
type Request struct {
	ID   string
	Hash string
	// Memo is kept with the first result of CreateSession and returned on
	// a replay: what the service needs to rebuild the first reply (which
	// holds a handle, and handles are never stored).
	Memo string
}

// RequestWindow is how long the first result of a request id is kept.
const RequestWindow = 15 * time.Minute

// Replay says whether a write was a replay of an earlier request.
type Replay struct {
	// Replayed is set when the request id had been seen within the
	// window: nothing was written and the result is the first run's.
	Replayed bool
	// RequestHash is the Hash stored by the first run (set when Replayed).
	RequestHash string
}

// PutOptions qualify PutCredential.
type PutOptions struct {
	Request Request
	// ExpectedVersion, if set, makes the put fail with ErrVersionConflict
	// unless the stored credential is at this version; 0 means it must not
	// exist.
	ExpectedVersion *int64
}

// PutResult is what PutCredential stored (or, replayed, first stored).
type PutResult struct {
	Replay
	Credential Credential
	Created    bool
}

// PutItem is one credential of PutCredentials.
type PutItem struct {
	Credential Credential
	Options    PutOptions
}

// PutItemResult is one item's outcome in PutCredentials: its PutResult, or
// Err (ErrVersionConflict, ErrInvalidArgument, ErrUnavailable...) if it
// was not written. An item the replicas did not acknowledge in time is
// written, and has an Err wrapping ErrUnavailable: retry it with the same
// request id.
type PutItemResult struct {
	PutResult
	Err error
}

// DeleteResult is how many live sessions a DeleteCredential revoked.
type DeleteResult struct {
	Replay
	Revoked int64
}

// SessionResult is the session CreateSession stored (or, replayed, first
// stored) and its memo.
type SessionResult struct {
	Replay
	Session Session
	Memo    string
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
	// ErrRejected: the credential's provider rejected it (CreateSession).
	ErrRejected = errors.New("store: credential rejected by its provider")
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
	// record and whether it was created; a replay returns the first
	// result, whose Credential has no Ciphertext.
	PutCredential(ctx context.Context, c Credential, opts PutOptions) (PutResult, error)
	// PutCredentials puts many credentials, sharing round trips: each item
	// as PutCredential would, atomically by itself, with its own result
	// (and nothing of an item that failed written).
	PutCredentials(ctx context.Context, items []PutItem) []PutItemResult
	GetCredential(ctx context.Context, tenantID, credentialID string) (Credential, error)
	// ListCredentials pages through a tenant's credentials ordered by id.
	// pageToken is opaque ("" for the first page); the returned token is ""
	// on the last page.
	ListCredentials(ctx context.Context, tenantID string, pageSize int, pageToken string) ([]Credential, string, error)
	// DeleteCredential deletes the credential and revokes all of its
	// sessions; it returns how many live sessions were revoked. A replay
	// returns the first count, where a repeated delete would find nothing.
	DeleteCredential(ctx context.Context, tenantID, credentialID string, req Request) (DeleteResult, error)
	// SetValidation records a validation outcome if the credential is still
	// at version; otherwise ErrVersionConflict.
	SetValidation(ctx context.Context, tenantID, credentialID string, version int64, v Validation) (Credential, error)
	// RecordUse records t as the last time the credential at version was
	// used upstream (last_used_time); ErrVersionConflict if it changed.
	RecordUse(ctx context.Context, tenantID, credentialID string, version int64, t time.Time) error
	// UpdateCiphertext replaces the ciphertext of the credential at version,
	// sealed with associated data version adVersion (after a transit rewrap
	// or a migration), without bumping the version or the generation;
	// ErrVersionConflict if the credential changed meanwhile.
	UpdateCiphertext(ctx context.Context, tenantID, credentialID string, version int64, ciphertext string, adVersion int) error
	// ForEachCredential calls fn for every credential of every tenant (rewrap).
	ForEachCredential(ctx context.Context, fn func(Credential) error) error

	// CreateSession stores s with a TTL until s.ExpireTime and adds it to
	// its credential's session set; ErrNotFound if the credential does not
	// exist, ErrRejected if its provider rejected it (its validation state
	// is ValidationRejected). Only a request with an ID is remembered (a
	// session write is idempotent by itself); its replay returns the first
	// session and memo.
	CreateSession(ctx context.Context, s Session, req Request) (SessionResult, error)
	// GetSession returns the live session stored under handleHash.
	GetSession(ctx context.Context, handleHash [32]byte) (Session, error)
	// GetSessionCredential returns the live session stored under
	// handleHash and the credential it names, read together (ErrNotFound
	// if there is no live session; a nil credential if it is gone).
	GetSessionCredential(ctx context.Context, handleHash [32]byte) (Session, *Credential, error)
	// DeleteSession revokes the session stored under handleHash.
	DeleteSession(ctx context.Context, handleHash [32]byte) (Session, error)
}
