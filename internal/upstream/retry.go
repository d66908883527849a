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

// Do runs f up to p.Attempts times while it fails with KindUnavailable,
// pausing a jittered delay between tries (so replicas retrying together do
// not hit the provider in step). Only idempotent reads may use it.
func (p RetryPolicy) Do(ctx context.Context, provider, op string, f func() error) error {
	var err error
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
				return &Error{Kind: KindUnavailable, Provider: provider, Op: op, Err: ctx.Err()}
			}
		}
		err = f()
		if err == nil || KindOf(err) != KindUnavailable || ctx.Err() != nil {
			return err
		}
	}
	return err
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
