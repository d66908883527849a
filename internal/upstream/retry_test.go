package upstream

import (
	"context"
	"encoding/base64"
	"errors"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestRetry(t *testing.T) {
	unavailable := &Error{Kind: KindUnavailable, Provider: "p", Op: "op"}
	rejected := &Error{Kind: KindRejected, Provider: "p", Op: "op"}
	policy := RetryPolicy{Attempts: 3, MinDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond}
	tests := []struct {
		name      string
		tries     []error // what each try fails with (nil: succeeds)
		want      []string
		wantErr   error
		wantTries int
	}{
		{"first try", []error{nil}, []string{"try 1"}, nil, 1},
		// A failed try's partial result never reaches the caller.
		{"only the successful try's value", []error{unavailable, unavailable, nil}, []string{"try 3"}, nil, 3},
		{"attempts are bounded", []error{unavailable, unavailable, unavailable, nil}, nil, unavailable, 3},
		{"only unavailability is retried", []error{rejected, nil}, nil, rejected, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tries := 0
			got, err := Retry(context.Background(), policy, "p", "op", func() ([]string, error) {
				tries++
				partial := []string{"try " + string(rune('0'+tries))}
				return partial, tt.tries[tries-1]
			})
			if !errors.Is(err, tt.wantErr) || !slices.Equal(got, tt.want) || tries != tt.wantTries {
				t.Fatalf("Retry = %v, %v after %d tries; want %v, %v after %d", got, err, tries, tt.want, tt.wantErr, tt.wantTries)
			}
		})
	}
}

func TestRetryStopsWhenTheCallerGivesUp(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	tries := 0
	_, err := Retry(ctx, RetryPolicy{Attempts: 5, MinDelay: time.Hour, MaxDelay: time.Hour}, "p", "op", func() (int, error) {
		tries++
		cancel()
		return 1, &Error{Kind: KindUnavailable}
	})
	if KindOf(err) != KindUnavailable || tries != 1 {
		t.Fatalf("Retry after cancel = %v after %d tries, want the try's error after 1 try", err, tries)
	}
}

// TestRetryStaysInsideTheDeadline: another try starts only if the pause and
// a try as long as the last both fit before the caller's deadline; the
// failure is then returned as it is, marked ErrOutOfTime, before the
// deadline passes.
func TestRetryStaysInsideTheDeadline(t *testing.T) {
	unavailable := &Error{Kind: KindUnavailable, Provider: "p", Op: "op"}
	tests := []struct {
		name      string
		deadline  time.Duration // from now; 0: none
		tryTakes  time.Duration
		policy    RetryPolicy
		wantTries int
		outOfTime bool
	}{
		{"no deadline: every attempt", 0, 0, RetryPolicy{Attempts: 3, MinDelay: time.Millisecond, MaxDelay: time.Millisecond}, 3, false},
		{"room for every attempt", time.Hour, 0, RetryPolicy{Attempts: 3, MinDelay: time.Millisecond, MaxDelay: time.Millisecond}, 3, false},
		{"no room for the pause", time.Minute, 0, RetryPolicy{Attempts: 3, MinDelay: time.Hour, MaxDelay: time.Hour}, 1, true},
		// A try took 200 ms and 100 ms are left: a second one would run
		// into the deadline.
		{"no room for a try as slow as the last", 300 * time.Millisecond, 200 * time.Millisecond, RetryPolicy{Attempts: 3, MinDelay: time.Millisecond, MaxDelay: time.Millisecond}, 1, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if tt.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.deadline)
				defer cancel()
			}
			tries := 0
			_, err := Retry(ctx, tt.policy, "p", "op", func() (int, error) {
				tries++
				time.Sleep(tt.tryTakes) // the upstream's answer taking its time
				return 0, unavailable
			})
			if tries != tt.wantTries || KindOf(err) != KindUnavailable || !errors.Is(err, unavailable) || errors.Is(err, ErrOutOfTime) != tt.outOfTime {
				t.Fatalf("Retry = %v after %d tries (out of time: %v); want the try's error after %d tries (out of time: %v)",
					err, tries, errors.Is(err, ErrOutOfTime), tt.wantTries, tt.outOfTime)
			}
		})
	}
}

func TestScrub(t *testing.T) {
	const secret = `Sec/ret+Value"0123` // 18 characters with / + and a quote
	tests := []struct {
		name    string
		text    string
		secrets []string
		want    string
	}{
		{"as sent", "bad token " + secret + " here", []string{secret}, "bad token [redacted] here"},
		{"another case", "bad token " + strings.ToUpper(secret), []string{secret}, "bad token [redacted]"},
		{"URL-escaped", "sid=" + url.QueryEscape(secret), []string{secret}, "sid=[redacted]"},
		{"path-escaped", "/x/" + url.PathEscape(secret), []string{secret}, "/x/[redacted]"},
		{"JSON-escaped", `{"token":"Sec\/ret+Value\"0123"}`, []string{secret}, `{"token":"[redacted]"}`},
		{"base64", "auth " + base64.StdEncoding.EncodeToString([]byte(secret)), []string{secret}, "auth [redacted]"},
		{"a short secret withholds the text", "bad key k9 for account 1", []string{"k9"}, Withheld},
		{"a one-character secret withholds the text", "anything", []string{"x"}, Withheld},
		{"empty secrets are ignored", "session expired", []string{""}, "session expired"},
		{"control characters", "a\nb\x00c", nil, "a b c"},
		{"bounded", strings.Repeat("é", 300), nil, strings.Repeat("é", 200) + "…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Scrub(tt.text, tt.secrets); got != tt.want {
				t.Errorf("Scrub(%q) = %q, want %q", tt.text, got, tt.want)
			}
		})
	}
}
