// Package client is what a service that calls fleetbroker needs: a
// HandleSource that issues a session handle through the credentials service
// and renews it ahead of expiry, plugged into grpc-go as per-RPC credentials
// so every gateway call carries a live handle; helpers that read a status's
// ErrorInfo reason and RetryInfo; and a service config whose retryPolicy
// stays inside the project's retry budget (docs/reliability.md).
//
// A handle is a bearer secret: this package never logs one and never puts
// one in an error.
package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
)

// Session says which session a HandleSource keeps alive.
type Session struct {
	TenantID     string
	CredentialID string
	// Scopes the handle carries; empty means read only.
	Scopes []credentialsv1.Scope
	// TTL of each handle; 0 means the server's default (15 minutes).
	TTL time.Duration
}

// Options tune a HandleSource. The zero value is usable.
type Options struct {
	// RenewBefore is how long before expiry a handle is replaced; 0 means
	// a third of the handle's lifetime.
	RenewBefore time.Duration
	// IssueTimeout bounds one IssueSession call; 0 means 10 s.
	IssueTimeout time.Duration
	// AllowInsecure lets the handle travel over a connection without
	// transport security. Only for `fleetbroker dev` on loopback, or behind
	// a sidecar that encrypts the hop.
	AllowInsecure bool
	// Now is the clock (tests); nil means time.Now.
	Now func() time.Time
}

// ErrStopped is wrapped by every error of a HandleSource that has stopped:
// closed, or told by the credentials service that its credential is gone or
// rejected, so a new handle cannot help. The wrapped status says which.
var ErrStopped = errors.New("fleetbroker client: handle source stopped")

// HandleSource issues a session handle for one credential, renews it ahead
// of expiry in the background, and hands it to every RPC as
// `authorization: Bearer <handle>`. It is safe for concurrent use. Use it
// with grpc.WithPerRPCCredentials, and add its interceptors
// (UnaryClientInterceptor, StreamClientInterceptor) so a revoked handle is
// replaced once and a deleted or rejected credential stops the source.
type HandleSource struct {
	sessions credentialsv1.SessionServiceClient
	session  Session
	opts     Options

	mu      sync.Mutex
	current *issued // nil before the first handle and after invalidate
	lastErr error   // the last IssueSession failure, for callers waiting on it
	stopErr error   // set once: the source has stopped (wraps ErrStopped)
	// inflight is closed when the running IssueSession finishes; nil when
	// none runs.
	inflight chan struct{}

	kick   chan struct{} // wakes the renewal loop after a new handle
	closed chan struct{}
	done   chan struct{}
}

type issued struct {
	handle    string
	sessionID string
	expire    time.Time
	renewAt   time.Time
}

// NewHandleSource returns a source for session that issues handles through
// sessions and renews them in the background until Close. The first handle
// is issued by the first call that needs one.
func NewHandleSource(sessions credentialsv1.SessionServiceClient, session Session, opts Options) *HandleSource {
	if opts.IssueTimeout <= 0 {
		opts.IssueTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &HandleSource{
		sessions: sessions, session: session, opts: opts,
		kick: make(chan struct{}, 1), closed: make(chan struct{}), done: make(chan struct{}),
	}
	go s.renewLoop()
	return s
}

// Handle returns a live handle, issuing one if there is none. Concurrent
// callers share one IssueSession call.
func (s *HandleSource) Handle(ctx context.Context) (string, error) {
	s.mu.Lock()
	if h, ok, err := s.liveLocked(); ok || err != nil {
		s.mu.Unlock()
		return h, err
	}
	wait := s.startIssueLocked()
	s.mu.Unlock()
	select {
	case <-wait:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if h, ok, err := s.liveLocked(); ok || err != nil {
		return h, err
	}
	return "", s.lastErr
}

// liveLocked returns the current handle if it is live, or the stop error.
func (s *HandleSource) liveLocked() (string, bool, error) {
	if s.stopErr != nil {
		return "", false, s.stopErr
	}
	if s.current != nil && s.opts.Now().Before(s.current.expire) {
		return s.current.handle, true, nil
	}
	return "", false, nil
}

// SessionID is the current session's id (safe to log), or "" when there is
// no live handle.
func (s *HandleSource) SessionID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current == nil {
		return ""
	}
	return s.current.sessionID
}

// Err is why the source stopped (it wraps ErrStopped and the status the
// credentials service answered), or nil while it runs.
func (s *HandleSource) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopErr
}

// Close stops renewal. It does not revoke the current handle, which calls
// in flight may still be using; the handle expires on its own.
func (s *HandleSource) Close() {
	s.mu.Lock()
	if s.stopErr == nil {
		s.stopErr = fmt.Errorf("%w: closed", ErrStopped)
	}
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	s.mu.Unlock()
	<-s.done
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (s *HandleSource) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	h, err := s.Handle(ctx)
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + h}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: a
// handle is a bearer secret and travels only over TLS unless
// Options.AllowInsecure says otherwise.
func (s *HandleSource) RequireTransportSecurity() bool { return !s.opts.AllowInsecure }

var _ credentials.PerRPCCredentials = (*HandleSource)(nil)

// invalidate drops the current handle if it is still h (the gateway said it
// is invalid: revoked, expired early, or its credential deleted), so the
// next call issues a new one — or learns that none can be issued.
func (s *HandleSource) invalidate(h string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current != nil && s.current.handle == h {
		s.current = nil
	}
}

// startIssueLocked starts an IssueSession unless one is running and returns
// the channel closed when it finishes. s.mu must be held.
func (s *HandleSource) startIssueLocked() <-chan struct{} {
	if s.inflight != nil {
		return s.inflight
	}
	done := make(chan struct{})
	s.inflight = done
	go func() {
		next, err := s.issue()
		s.mu.Lock()
		s.inflight = nil
		s.lastErr = err
		switch {
		case err == nil:
			s.current = next
			select {
			case s.kick <- struct{}{}:
			default:
			}
		case stopsSource(err) && s.stopErr == nil:
			s.stopErr = fmt.Errorf("%w: %w", ErrStopped, err)
		}
		s.mu.Unlock()
		close(done)
	}()
	return done
}

func (s *HandleSource) issue() (*issued, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.IssueTimeout)
	defer cancel()
	req := &credentialsv1.IssueSessionRequest{TenantId: s.session.TenantID, CredentialId: s.session.CredentialID, Scopes: s.session.Scopes}
	if s.session.TTL > 0 {
		req.Ttl = durationpb.New(s.session.TTL)
	}
	resp, err := s.sessions.IssueSession(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("issue session for %s/%s: %w", s.session.TenantID, s.session.CredentialID, err)
	}
	expire := resp.GetExpireTime().AsTime()
	renewBefore := s.opts.RenewBefore
	if renewBefore <= 0 {
		renewBefore = expire.Sub(s.opts.Now()) / 3
	}
	return &issued{handle: resp.GetHandle(), sessionID: resp.GetSessionId(), expire: expire, renewAt: expire.Add(-renewBefore)}, nil
}

// stopsSource says whether an IssueSession failure means no retry can
// succeed until a person acts: the credential is gone or rejected by its
// provider, or this caller may not issue sessions for it.
func stopsSource(err error) bool {
	switch status.Code(err) {
	case codes.NotFound, codes.PermissionDenied, codes.InvalidArgument, codes.Unauthenticated:
		return true
	case codes.FailedPrecondition:
		return IsCredentialRejected(err)
	}
	return false
}

// renewLoop replaces the handle at its renewal time. A failed renewal is
// retried with backoff while the old handle lives; callers keep using the
// old one meanwhile, and issue on demand once it has expired.
func (s *HandleSource) renewLoop() {
	defer close(s.done)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	backoff := time.Second
	for {
		s.mu.Lock()
		cur := s.current
		s.mu.Unlock()
		timer.Stop()
		var fire <-chan time.Time
		if cur != nil {
			timer.Reset(max(cur.renewAt.Sub(s.opts.Now()), 0))
			fire = timer.C
		}
		select {
		case <-s.closed:
			return
		case <-s.kick:
			backoff = time.Second
			continue
		case <-fire:
		}
		s.mu.Lock()
		if s.stopErr != nil {
			s.mu.Unlock()
			return
		}
		wait := s.startIssueLocked()
		s.mu.Unlock()
		select {
		case <-wait:
		case <-s.closed:
			return
		}
		s.mu.Lock()
		failed := s.lastErr != nil
		s.mu.Unlock()
		if !failed {
			continue
		}
		select {
		case <-time.After(backoff):
		case <-s.closed:
			return
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}
