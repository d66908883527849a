package client_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/client"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
)

func TestErrorHelpers(t *testing.T) {
	type want struct {
		reason                         string
		rejected, invalid, gone, retry bool
		delay                          time.Duration
	}
	for _, tc := range []struct {
		name string
		err  error
		want want
	}{
		{"nil", nil, want{}},
		{"plain error", errors.New("boom"), want{}},
		{"status without details", status.Error(codes.Unavailable, "down"), want{}},
		{"rejected", apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected, "replace it", nil),
			want{reason: client.ReasonCredentialRejected, rejected: true}},
		{"session invalid", apierr.New(codes.Unauthenticated, apierr.ReasonSessionInvalid, "invalid", nil),
			want{reason: client.ReasonSessionInvalid, invalid: true}},
		{"credential gone, wrapped", fmt.Errorf("%w: %w", client.ErrStopped, apierr.New(codes.NotFound, apierr.ReasonCredentialNotFound, "no such credential", nil)),
			want{reason: client.ReasonCredentialNotFound, gone: true}},
		{"rate limited", apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, "slow down", 1500*time.Millisecond),
			want{reason: client.ReasonUpstreamRateLimited, retry: true, delay: 1500 * time.Millisecond}},
		{"upstream down", apierr.Retryable(codes.Unavailable, apierr.ReasonUpstreamUnavailable, "down", time.Second),
			want{reason: client.ReasonUpstreamUnavailable, retry: true, delay: time.Second}},
		{"credentials service down", apierr.Retryable(codes.Unavailable, apierr.ReasonCredentialsUnavailable, "down", 2*time.Second),
			want{reason: client.ReasonCredentialsUnavailable, retry: true, delay: 2 * time.Second}},
		{"too many streams", apierr.New(codes.ResourceExhausted, apierr.ReasonTooManyStreams, "close one", nil),
			want{reason: client.ReasonTooManyStreams}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			delay, retry := client.RetryDelay(tc.err)
			got := want{
				reason: client.Reason(tc.err), rejected: client.IsCredentialRejected(tc.err), invalid: client.IsSessionInvalid(tc.err),
				gone: client.IsCredentialGone(tc.err), retry: retry, delay: delay,
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
			if client.IsRetryable(tc.err) != tc.want.retry {
				t.Errorf("IsRetryable = %v, want %v", !tc.want.retry, tc.want.retry)
			}
		})
	}
}
