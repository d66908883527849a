package gateway

import (
	"context"
	"time"
)

// sharedReadTimeout bounds a shared upstream read, which runs detached from
// the caller that started it so one caller leaving does not fail the rest.
const sharedReadTimeout = 30 * time.Second

// shared runs read once for all concurrent callers asking the same thing
// (op) of the same credential generation, so a burst of callers and watch polls
// costs one upstream request. Only reads whose answer does not depend on the
// caller may be shared; the caller's own session was checked before.
func shared[T any](ctx context.Context, s *Service, sess *session, op string, read func(context.Context) (T, error)) (T, error) {
	key := op + "\x00" + sess.target().SessionKey()
	ch := s.reads.DoChan(key, func() (any, error) {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), sharedReadTimeout)
		defer cancel()
		return read(rctx)
	})
	select {
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	case r := <-ch:
		if r.Err != nil {
			var zero T
			return zero, r.Err
		}
		return r.Val.(T), nil
	}
}
