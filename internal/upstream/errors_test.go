package upstream

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
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

// TestExchange: a reply within the limit comes back whole with its status;
// a longer one, or no answer at all, is an *Error of the right kind that
// names the provider and operation.
func TestExchange(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		_, _ = w.Write([]byte(strings.Repeat("x", 10)))
	}))
	defer srv.Close()
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	tests := []struct {
		name     string
		url      string
		limit    int64
		wantBody string
		wantErr  bool
		wantKind Kind
	}{
		{"within the limit", srv.URL, 10, strings.Repeat("x", 10), false, 0},
		{"over the limit", srv.URL, 9, "", true, KindInternal},
		{"no answer", gone.URL, 10, "", true, KindUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, tt.url, nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, body, err := Exchange(ctx, srv.Client(), req, "prov", "op", tt.limit)
			if !tt.wantErr {
				if err != nil || resp.StatusCode != http.StatusTeapot || string(body) != tt.wantBody {
					t.Fatalf("Exchange = %v, %q, %v", resp, body, err)
				}
				return
			}
			var ue *Error
			if !errors.As(err, &ue) || ue.Kind != tt.wantKind || ue.Provider != "prov" || ue.Op != "op" {
				t.Fatalf("Exchange error = %#v, want kind %v for prov/op", err, tt.wantKind)
			}
		})
	}
}
