package upstream

import (
	"context"
	"math/rand/v2"
	"strings"
	"time"
	"unicode"
)

// RetryPolicy bounds retries of idempotent upstream reads.
type RetryPolicy struct {
	Attempts           int
	MinDelay, MaxDelay time.Duration
}

// Retry runs f up to p.Attempts times while it fails with KindUnavailable,
// pausing a jittered delay between tries (so replicas retrying together do
// not hit the provider in step), and returns the value of the last try.
// Each try returns its own value: nothing a failed try decoded can leak
// into the result of the next. Only idempotent reads may use it.
func Retry[T any](ctx context.Context, p RetryPolicy, provider, op string, f func() (T, error)) (T, error) {
	var zero T
	for i := range max(p.Attempts, 1) {
		if i > 0 {
			d := p.MinDelay
			if span := p.MaxDelay - p.MinDelay; span > 0 {
				d += rand.N(span)
			}
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return zero, &Error{Kind: KindUnavailable, Provider: provider, Op: op, Err: ctx.Err()}
			}
		}
		v, err := f()
		if err == nil {
			return v, nil
		}
		if KindOf(err) != KindUnavailable || ctx.Err() != nil || i == max(p.Attempts, 1)-1 {
			return zero, err
		}
	}
	return zero, nil // unreachable: the last try returns
}

// Scrub makes provider text safe to put in an error: the secrets the
// request carried are cut out, control characters dropped, length bounded.
func Scrub(s string, secrets []string) string {
	for _, sec := range secrets {
		if len(sec) >= 4 {
			s = strings.ReplaceAll(s, sec, "[redacted]")
		}
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if r := []rune(s); len(r) > 200 {
		s = string(r[:200]) + "…"
	}
	return strings.TrimSpace(s)
}
