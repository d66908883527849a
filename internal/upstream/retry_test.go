package upstream

import (
	"context"
	"errors"
	"slices"
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
