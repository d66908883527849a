package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/prototext"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// internalDetail is what the credentials service's statuses below carry and
// a gateway caller must never see.
const internalDetail = "spiffe://example.org/ns/fleetbroker/sa/gateway tenant globex dial tcp 10.0.0.7:7401"

// TestCredentialsStatusesAreMapped: every status of the credentials
// service reaches a gateway caller as a code, a stable reason and the
// gateway's own message — relayed reasons keep their code and RetryInfo —
// and none of the service's text or metadata.
func TestCredentialsStatusesAreMapped(t *testing.T) {
	svc := &Service{cfg: Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}}
	remote := func(code codes.Code, reason string, retry time.Duration) error {
		var err error
		switch {
		case reason == "":
			err = status.Error(code, internalDetail)
		case retry > 0:
			err = apierr.Retryable(code, reason, internalDetail, retry)
		default:
			err = apierr.New(code, reason, internalDetail, map[string]string{"tenant_id": "globex"})
		}
		// As the gateway meets it: from its client, wrapped on the way up.
		return fmt.Errorf("tokencache: mint: %w", wrapCredentials("MintUpstreamSession", err))
	}
	tests := []struct {
		name       string
		err        error
		wantCode   codes.Code
		wantReason string
		wantRetry  time.Duration // 0: no RetryInfo
	}{
		{"unreachable", remote(codes.Unavailable, "", 0), codes.Unavailable, apierr.ReasonCredentialsUnavailable, time.Second},
		{"too slow", remote(codes.DeadlineExceeded, "", 0), codes.Unavailable, apierr.ReasonCredentialsUnavailable, time.Second},
		{"its audit trail down", remote(codes.Unavailable, apierr.ReasonAuditUnavailable, 2*time.Second), codes.Unavailable, apierr.ReasonCredentialsUnavailable, 2 * time.Second},
		{"the gateway rate-limited", remote(codes.ResourceExhausted, apierr.ReasonRateLimited, 3*time.Second), codes.Unavailable, apierr.ReasonCredentialsUnavailable, 3 * time.Second},
		{"the gateway not granted the tenant", remote(codes.PermissionDenied, apierr.ReasonPermissionDenied, 0), codes.Internal, apierr.ReasonInternal, 0},
		{"a request the service refuses", remote(codes.InvalidArgument, apierr.ReasonInvalidArgument, 0), codes.Internal, apierr.ReasonInternal, 0},
		{"an old service", remote(codes.Unimplemented, apierr.ReasonRetired, 0), codes.Internal, apierr.ReasonInternal, 0},
		{"handle revoked meanwhile", remote(codes.Unauthenticated, apierr.ReasonSessionInvalid, 0), codes.Unauthenticated, apierr.ReasonSessionInvalid, 0},
		{"credential deleted meanwhile", remote(codes.NotFound, apierr.ReasonCredentialNotFound, 0), codes.Unauthenticated, apierr.ReasonSessionInvalid, 0},
		{"credential rejected", remote(codes.FailedPrecondition, apierr.ReasonCredentialRejected, 0), codes.FailedPrecondition, apierr.ReasonCredentialRejected, 0},
		{"credential undecryptable", remote(codes.FailedPrecondition, apierr.ReasonCredentialUndecryptable, 0), codes.FailedPrecondition, apierr.ReasonCredentialUndecryptable, 0},
		{"credential changed", remote(codes.Aborted, apierr.ReasonCredentialChanged, 0), codes.Aborted, apierr.ReasonCredentialChanged, 0},
		{"upstream not allowed", remote(codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed, 0), codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed, 0},
		{"login rate-limited", remote(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, 5*time.Second), codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, 5 * time.Second},
		{"login unavailable", remote(codes.Unavailable, apierr.ReasonUpstreamUnavailable, 0), codes.Unavailable, apierr.ReasonUpstreamUnavailable, time.Second},
		{"login timed out", remote(codes.DeadlineExceeded, apierr.ReasonUpstreamUnavailable, 0), codes.Unavailable, apierr.ReasonUpstreamUnavailable, time.Second},
		{"vault down", remote(codes.Unavailable, apierr.ReasonVaultUnavailable, time.Second), codes.Unavailable, apierr.ReasonVaultUnavailable, time.Second},
		{"redis down", remote(codes.Unavailable, apierr.ReasonStoreUnavailable, time.Second), codes.Unavailable, apierr.ReasonStoreUnavailable, time.Second},
		{"transit key lost", remote(codes.Unavailable, apierr.ReasonEncryptionKeyUnusable, 30*time.Second), codes.Unavailable, apierr.ReasonEncryptionKeyUnusable, 30 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := svc.toStatus(context.Background(), "list units", tt.err)
			st := status.Convert(got)
			delay, retry := retryDelay(st)
			if st.Code() != tt.wantCode || apierr.Reason(got) != tt.wantReason || delay != tt.wantRetry || retry != (tt.wantRetry > 0) {
				t.Errorf("toStatus = %v (reason %q, RetryInfo %v %s); want %v, %q, RetryInfo %s", got, apierr.Reason(got), retry, delay, tt.wantCode, tt.wantReason, tt.wantRetry)
			}
			text := prototext.Format(st.Proto())
			for _, leak := range []string{"spiffe", "globex", "10.0.0.7", "dial", "tokencache", "MintUpstreamSession"} {
				if strings.Contains(text, leak) {
					t.Errorf("the caller's status holds %q:\n%s", leak, text)
				}
			}
		})
	}
}

// TestProviderTextNeverReachesTheCaller: whatever the provider said stays
// in the log; the caller gets the gateway's words, and the provider
// package's own hint where it has one for a failure the caller can act on.
func TestProviderTextNeverReachesTheCaller(t *testing.T) {
	svc := &Service{cfg: Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}}
	for k := upstream.KindInternal; k <= upstream.KindNotAllowed; k++ {
		err := &upstream.Error{Kind: k, Provider: "wialon", Op: "core/search_items", Code: 5, Reason: "provider-text-canary"}
		text := prototext.Format(status.Convert(svc.toStatus(context.Background(), "list units", err)).Proto())
		if strings.Contains(text, "provider-text-canary") || strings.Contains(text, "core/search_items") {
			t.Errorf("kind %s: the caller's status holds the provider's text:\n%s", k, text)
		}
	}
	for _, k := range []upstream.Kind{upstream.KindInternal, upstream.KindRateLimited, upstream.KindUnavailable, upstream.KindSessionInvalid,
		upstream.KindInvalidInput, upstream.KindAccessDenied} {
		err := &upstream.Error{Kind: k, Provider: "wialon", Op: "messages/load_interval", Code: 1004, Reason: "provider-text-canary", Hint: "narrow the interval"}
		msg := status.Convert(svc.toStatus(context.Background(), "get position history", err)).Message()
		if strings.Contains(msg, "provider-text-canary") || !strings.Contains(msg, "narrow the interval") {
			t.Errorf("kind %s: the caller's message %q, want the hint and not the provider's text", k, msg)
		}
	}
}

func TestStreamLimits(t *testing.T) {
	l := newStreamLimits(2, 3)
	a, b := &session{handle: "fbs_a", tenantID: "acme"}, &session{handle: "fbs_b", tenantID: "acme"}
	other := &session{handle: "fbs_c", tenantID: "globex"}
	steps := []struct {
		sess       *session
		wantScope  string // "" means accepted
		releaseOne bool   // release one of sess's accepted streams instead
	}{
		{sess: a}, {sess: a},
		{sess: a, wantScope: "handle"},
		{sess: b},
		{sess: b, wantScope: "tenant"},
		{sess: other}, {sess: other},
		{sess: a, releaseOne: true},
		{sess: b},
		{sess: a, wantScope: "tenant"},
	}
	held := map[*session][]func(){}
	for i, step := range steps {
		if step.releaseOne {
			held[step.sess][0]()
			held[step.sess] = held[step.sess][1:]
			continue
		}
		release, err := l.acquire(step.sess)
		if scope := limitScope(err); scope != step.wantScope {
			t.Fatalf("step %d (%s/%s): refused for %q (%v), want %q", i, step.sess.tenantID, step.sess.handle, scope, err, step.wantScope)
		}
		if err == nil {
			held[step.sess] = append(held[step.sess], release)
		}
	}
	for _, releases := range held {
		for _, release := range releases {
			release()
		}
	}
	if len(l.byHandle) != 0 || len(l.byTenant) != 0 {
		t.Errorf("after every stream ended the counts hold %v, %v; want nothing", l.byHandle, l.byTenant)
	}
}

func limitScope(err error) string {
	if err == nil {
		return ""
	}
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(interface{ GetMetadata() map[string]string }); ok {
			return info.GetMetadata()["limit_scope"]
		}
	}
	return "?"
}
