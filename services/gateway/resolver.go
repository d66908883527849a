package gateway

import (
	"context"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// DefaultHandleCacheTTL is how long a resolution is reused. A revoked handle
// keeps working on a replica for at most this long.
const DefaultHandleCacheTTL = 5 * time.Second

// maxHandleCacheTTL bounds --handle-cache-ttl: revocation must stay prompt.
const maxHandleCacheTTL = 5 * time.Second

// Defaults of the defences against invalid handles.
const (
	// negativeCacheTTL: a handle the credentials service called invalid is
	// answered from memory this long. A handle never becomes valid again
	// (expired, revoked, its credential gone), so this only bounds memory.
	negativeCacheTTL = 30 * time.Second
	// DefaultInvalidHandleRate and DefaultInvalidHandleBurst bound how many
	// invalid handles one peer may present (per second, and at once) before
	// its calls with handles this replica has not seen succeed are refused.
	DefaultInvalidHandleRate  = 1.0
	DefaultInvalidHandleBurst = 20
	// maxCacheEntries bounds each of the resolver's maps.
	maxCacheEntries = 16384
	// resolveTimeout bounds one ResolveSession call (the credentials
	// service answers it from Redis, without Vault).
	resolveTimeout = 5 * time.Second
)

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
// service back for the secret).
//
// Invalid handles cost their sender, not the broker: a handle is checked
// against the handle keys first (a forged or mistyped one never leaves the
// replica), a handle the credentials service refused is remembered for a
// while (negativeCacheTTL), and a peer that presents too many invalid
// handles has its calls with unknown handles refused (RESOURCE_EXHAUSTED)
// until its budget refills. A handle that resolved stays served from the
// cache whatever its peer's budget.
type resolver struct {
	client   credentialsv1.SessionServiceClient
	verifier handle.Verifier
	ttl      time.Duration
	now      func() time.Time
	// invalidRate and invalidBurst shape each peer's budget of invalid handles.
	invalidRate  rate.Limit
	invalidBurst int

	flight singleflight.Group // remote resolutions under way, by handle hash

	mu       sync.Mutex
	entries  map[handle.Hash]resolved
	negative map[handle.Hash]time.Time // expiry
	peers    map[string]*rate.Limiter
}

type resolved struct {
	sess    *session
	expires time.Time
}

func newResolver(client credentialsv1.SessionServiceClient, verifier handle.Verifier, ttl time.Duration, invalidRate float64, invalidBurst int) *resolver {
	if ttl > maxHandleCacheTTL {
		ttl = maxHandleCacheTTL
	}
	return &resolver{
		client: client, verifier: verifier, ttl: ttl, now: time.Now,
		invalidRate: rate.Limit(invalidRate), invalidBurst: invalidBurst,
		entries: map[handle.Hash]resolved{}, negative: map[handle.Hash]time.Time{}, peers: map[string]*rate.Limiter{},
	}
}

// resolve returns the live session behind h, from the cache when fresh.
func (r *resolver) resolve(ctx context.Context, h string) (*session, error) {
	return r.lookup(ctx, h, true)
}

// revalidate is resolve for a handle that already resolved on this call
// (an open stream's periodic check): the peer's budget does not apply.
func (r *resolver) revalidate(ctx context.Context, h string) (*session, error) {
	return r.lookup(ctx, h, false)
}

func (r *resolver) lookup(ctx context.Context, h string, limited bool) (*session, error) {
	peerKey := peerOf(ctx)
	checked, err := r.verifier.Verify(ctx, h)
	if err != nil {
		return nil, r.invalid(peerKey, limited)
	}
	now := r.now()
	if sess, ok := r.cached(checked.Hash, now); ok {
		return sess, nil
	}
	if r.knownInvalid(checked.Hash, now) {
		return nil, r.invalid(peerKey, limited)
	}
	if limited && r.exhausted(peerKey) {
		return nil, errTooManyInvalid
	}
	sess, err := r.resolveShared(ctx, checked.Hash, h)
	if err != nil {
		if status.Code(err) == codes.Unauthenticated {
			return nil, r.invalid(peerKey, limited)
		}
		return nil, err
	}
	return sess, nil
}

// resolveShared asks the credentials service once for all concurrent
// lookups of one handle (the streams of a handle revalidating together as
// its resolution expires, a burst of calls), each caller waiting within its
// own context. The call runs detached from the caller that started it, so
// one leaving does not fail the rest, within resolveTimeout; it caches its
// answer before the next lookup of the handle can start another.
func (r *resolver) resolveShared(ctx context.Context, hash handle.Hash, h string) (*session, error) {
	ch := r.flight.DoChan(string(hash[:]), func() (any, error) {
		now := r.now()
		resp, err := r.resolveRemote(context.WithoutCancel(ctx), h)
		if err != nil {
			if status.Code(err) == codes.Unauthenticated {
				r.rememberInvalid(hash, now)
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
	})
	select {
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*session), nil
	}
}

// resolveRemote asks the credentials service, within the caller's budget
// and resolveTimeout: an unreachable or hanging service is answered
// UNAVAILABLE CREDENTIALS_SERVICE_UNAVAILABLE before the caller's deadline.
func (r *resolver) resolveRemote(ctx context.Context, h string) (*credentialsv1.ResolveSessionResponse, error) {
	ctx, cancel := callBudget(ctx)
	defer cancel()
	ctx, cancelTimeout := context.WithTimeout(ctx, resolveTimeout)
	defer cancelTimeout()
	return r.client.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: h})
}

var errTooManyInvalid = apierr.Retryable(codes.ResourceExhausted, apierr.ReasonRateLimited,
	"too many invalid session handles from this caller; retry later", time.Second)

// invalid charges peerKey one invalid handle and returns the error for it.
func (r *resolver) invalid(peerKey string, limited bool) error {
	if limited {
		r.limiter(peerKey).Allow()
	}
	return errInvalidHandle
}

// exhausted reports whether peerKey has no invalid handles left to spend.
func (r *resolver) exhausted(peerKey string) bool {
	return r.limiter(peerKey).Tokens() < 1
}

func (r *resolver) limiter(peerKey string) *rate.Limiter {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, ok := r.peers[peerKey]
	if ok {
		return l
	}
	if len(r.peers) >= maxCacheEntries {
		// Forget peers with a full budget: they owe nothing.
		for k, l := range r.peers {
			if l.Tokens() >= float64(r.invalidBurst) {
				delete(r.peers, k)
			}
		}
	}
	l = rate.NewLimiter(r.invalidRate, r.invalidBurst)
	if len(r.peers) < maxCacheEntries {
		r.peers[peerKey] = l
	}
	return l
}

// peerOf names the caller for its budget of invalid handles: its principal
// when it has one (a certificate, an API key, a trusted proxy's header),
// else its address without the port.
func peerOf(ctx context.Context) string {
	if p, ok := authn.FromContext(ctx); ok && p.Name != "" && p.Via != authn.ViaNone {
		return "principal:" + p.Name
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		addr := p.Addr.String()
		if host, _, err := net.SplitHostPort(addr); err == nil {
			addr = host
		}
		return "addr:" + addr
	}
	return "unknown"
}

func (r *resolver) knownInvalid(hash handle.Hash, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	expires, ok := r.negative[hash]
	if ok && !now.Before(expires) {
		delete(r.negative, hash)
		return false
	}
	return ok
}

func (r *resolver) rememberInvalid(hash handle.Hash, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.negative) >= maxCacheEntries {
		for k, e := range r.negative {
			if !now.Before(e) {
				delete(r.negative, k)
			}
		}
		if len(r.negative) >= maxCacheEntries {
			return
		}
	}
	r.negative[hash] = now.Add(negativeCacheTTL)
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
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.entries, handle.HashOf(h))
}
