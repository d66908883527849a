package gateway

import (
	"context"
	"errors"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Budgets of the work a call makes the gateway do (docs/reliability.md,
// "Retry budget").
const (
	// sharedReadTimeout bounds a shared upstream read started by a caller
	// without a deadline (a watch poll).
	sharedReadTimeout = 30 * time.Second
	// The gateway keeps a tenth of a caller's remaining time, within these
	// bounds (and never more than half of it), to answer: work on the
	// caller's behalf stops that long before the caller's deadline, so a
	// slow dependency is answered UNAVAILABLE with RetryInfo rather than by
	// the caller's own DEADLINE_EXCEEDED.
	minAnswerReserve = 100 * time.Millisecond
	maxAnswerReserve = time.Second
)

// callBudget returns ctx with a deadline a little before the caller's (see
// minAnswerReserve); without a caller's deadline, ctx unchanged.
func callBudget(ctx context.Context) (context.Context, context.CancelFunc) {
	deadline, ok := ctx.Deadline()
	if !ok {
		return context.WithCancel(ctx)
	}
	remaining := time.Until(deadline)
	reserve := min(max(remaining/10, minAnswerReserve), maxAnswerReserve, max(remaining/2, 0))
	return context.WithDeadline(ctx, deadline.Add(-reserve))
}

// flight is what one shared read returns: its value and the deadline it ran
// under, which may be earlier than a joiner's.
type flight[T any] struct {
	val      T
	deadline time.Time
}

// shared runs read once for all concurrent callers asking the same thing
// (op) of the same credential generation, so a burst of callers and watch
// polls costs one upstream request. Only reads whose answer does not depend
// on the caller may be shared; the caller's own session was checked before.
//
// The read runs detached from the caller that started it, so one caller
// leaving does not fail the rest, within that caller's budget (callBudget;
// sharedReadTimeout for a caller without a deadline). Each caller waits
// within its own budget, and is never failed by another caller's: when a
// read ran out of its starter's time (the deadline cut it, or left no room
// for another attempt: upstream.ErrOutOfTime), a caller with a later
// deadline reads again on its own.
func shared[T any](ctx context.Context, s *Service, sess *session, op string, read func(context.Context) (T, error)) (T, error) {
	var zero T
	key := op + "\x00" + sess.target().SessionKey()
	budget, cancel := callBudget(ctx)
	defer cancel()
	mine, bounded := budget.Deadline()
	for {
		if err := budget.Err(); err != nil {
			return zero, err // never start a read with no time left
		}
		ch := s.reads.DoChan(key, func() (any, error) {
			deadline := mine
			if !bounded {
				deadline = time.Now().Add(sharedReadTimeout)
			}
			rctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), deadline)
			defer cancel()
			v, err := read(rctx)
			return flight[T]{val: v, deadline: deadline}, err
		})
		select {
		case <-budget.Done():
			return zero, budget.Err()
		case r := <-ch:
			f, _ := r.Val.(flight[T])
			if r.Err == nil {
				return f.val, nil
			}
			if ranOutOfTime(r.Err) && bounded && mine.After(f.deadline) && budget.Err() == nil {
				continue // another caller's deadline ended that read, not ours
			}
			return zero, r.Err
		}
	}
}

// ranOutOfTime reports a read that ended for want of time, not for what
// the upstream answered.
func ranOutOfTime(err error) bool {
	return errors.Is(err, upstream.ErrOutOfTime) || errors.Is(err, context.DeadlineExceeded)
}
