package upstream

import (
	"net/http"
	"testing"
	"time"
)

// TestRetryAfter: seconds and HTTP dates are honoured up to an hour; what
// cannot be read, or lies in the past, is the caller's fallback.
func TestRetryAfter(t *testing.T) {
	const fallback = 1500 * time.Millisecond
	tests := []struct {
		header   string
		min, max time.Duration
	}{
		{"3", 3 * time.Second, 3 * time.Second},
		{" 7 ", 7 * time.Second, 7 * time.Second},
		{"99999", time.Hour, time.Hour},
		{"0", fallback, fallback},
		{"-2", fallback, fallback},
		{"", fallback, fallback},
		{"soon", fallback, fallback},
		{time.Now().Add(-time.Minute).UTC().Format(http.TimeFormat), fallback, fallback},
		{time.Now().Add(30 * time.Second).UTC().Format(http.TimeFormat), 20 * time.Second, 30 * time.Second},
		{time.Now().Add(48 * time.Hour).UTC().Format(http.TimeFormat), time.Hour, time.Hour},
	}
	for _, tt := range tests {
		if got := RetryAfter(tt.header, fallback); got < tt.min || got > tt.max {
			t.Errorf("RetryAfter(%q) = %v, want between %v and %v", tt.header, got, tt.min, tt.max)
		}
	}
}
