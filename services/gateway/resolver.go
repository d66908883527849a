package gateway

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// DefaultHandleCacheTTL is how long a resolution is reused. A revoked handle
// keeps working on a replica for at most this long.
const DefaultHandleCacheTTL = 5 * time.Second

// maxHandleCacheTTL bounds --handle-cache-ttl: revocation must stay prompt.
const maxHandleCacheTTL = 5 * time.Second

// session is a resolved handle: what the caller may do with which credential.
type session struct {
	handle       string
	sessionID    string
	tenantID     string
	credentialID string
	version      int64
	provider     credentialsv1.Provider
	scopes       []credentialsv1.Scope
	expireTime   time.Time
	baseURL      string
	// generation identifies the credential's exact secret: upstream
	// sessions are cached, minted and purged per generation.
	generation string
	// account is the credential's public upstream account ("" if none).
	account string
}

// target is what a provider may know of the call's credential.
func (s *session) target() provider.Target {
	return provider.Target{Tenant: s.tenantID, Credential: s.credentialID, Generation: s.generation, BaseURL: s.baseURL, Account: s.account}
}

func (s *session) hasScope(want credentialsv1.Scope) bool {
	for _, sc := range s.scopes {
		if sc == want {
			return true
		}
	}
	return false
}

// resolver turns handles into sessions through the credentials service and
// caches each answer for at most ttl, keyed by the handle's SHA-256 (the
// handle itself is kept only inside the entry, to call the credentials
// service back for the secret). Failures are not cached, so a new handle
// works at once.
type resolver struct {
	client credentialsv1.SessionServiceClient
	ttl    time.Duration
	now    func() time.Time

	mu      sync.Mutex
	entries map[handle.Hash]resolved
}

type resolved struct {
	sess    *session
	expires time.Time
}

func newResolver(client credentialsv1.SessionServiceClient, ttl time.Duration) *resolver {
	if ttl > maxHandleCacheTTL {
		ttl = maxHandleCacheTTL
	}
	return &resolver{client: client, ttl: ttl, now: time.Now, entries: map[handle.Hash]resolved{}}
}

// resolve returns the live session behind h, from the cache when fresh.
func (r *resolver) resolve(ctx context.Context, h string) (*session, error) {
	hash, err := handle.Parse(h)
	if err != nil {
		return nil, errInvalidHandle
	}
	now := r.now()
	if sess, ok := r.cached(hash, now); ok {
		return sess, nil
	}
	resp, err := r.client.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: h})
	if err != nil {
		if status.Code(err) == codes.Unauthenticated {
			return nil, errInvalidHandle
		}
		return nil, err
	}
	sess := &session{
		handle: h, sessionID: resp.GetSessionId(), tenantID: resp.GetTenantId(), credentialID: resp.GetCredentialId(),
		version: resp.GetCredentialVersion(), provider: resp.GetProvider(), scopes: resp.GetScopes(),
		expireTime: resp.GetExpireTime().AsTime(), baseURL: resp.GetBaseUrl(),
		generation: resp.GetCredentialGeneration(), account: resp.GetUpstreamAccount(),
	}
	r.store(hash, sess, now)
	return sess, nil
}

func (r *resolver) cached(hash handle.Hash, now time.Time) (*session, bool) {
	if r.ttl <= 0 {
		return nil, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.entries[hash]
	if !ok || !now.Before(e.expires) {
		delete(r.entries, hash)
		return nil, false
	}
	return e.sess, true
}

// store caches sess until the cache TTL or the session's own expiry,
// whichever comes first, and sweeps expired entries now and then so the
// map stays bounded by the live handles of the last ttl.
func (r *resolver) store(hash handle.Hash, sess *session, now time.Time) {
	if r.ttl <= 0 {
		return
	}
	expires := now.Add(r.ttl)
	if sess.expireTime.Before(expires) {
		expires = sess.expireTime
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.entries) >= 1024 && len(r.entries)%1024 == 0 {
		for k, e := range r.entries {
			if !now.Before(e.expires) {
				delete(r.entries, k)
			}
		}
	}
	r.entries[hash] = resolved{sess: sess, expires: expires}
}

// forget drops h's cached resolution, so the next call resolves it afresh
// (after the credential changed under it).
func (r *resolver) forget(h string) {
	hash, err := handle.Parse(h)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.entries, hash)
}
