package store

import (
	"context"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// putBatchSize is the most items one putBatchScript call carries: a script
// blocks Redis while it runs, so a big batch goes as a few calls (in one
// pipeline).
const putBatchSize = 100

// PutCredentials implements Store: the items of one tenant (one hash
// slot) go in putBatchScript calls of up to putBatchSize items, all in one
// pipeline (one round trip, and one WAIT for the replicas after them), each
// item applied atomically by itself.
func (r *Redis) PutCredentials(ctx context.Context, items []PutItem) []PutItemResult {
	out := make([]PutItemResult, len(items))
	type call struct {
		keys []string
		args []any
	}
	calls := make([]call, len(items))
	byTenant := map[string][]int{}
	var tenants []string
	for i, it := range items {
		keys, args, err := r.putCall(it.Credential, it.Options)
		if err != nil {
			out[i].Err = err
			continue
		}
		calls[i] = call{keys, args}
		t := it.Credential.TenantID
		if _, ok := byTenant[t]; !ok {
			tenants = append(tenants, t)
		}
		byTenant[t] = append(byTenant[t], i)
	}
	for _, t := range tenants {
		idx := byTenant[t]
		var chunks [][]int
		for off := 0; off < len(idx); off += putBatchSize {
			chunks = append(chunks, idx[off:min(off+putBatchSize, len(idx))])
		}
		replies := make([]*redis.Cmd, len(chunks))
		err := r.durable(ctx, calls[idx[0]].keys[0], func(cl redis.Cmdable) error {
			return runPipelined(ctx, cl, putBatchScript, len(chunks), func(c int) ([]string, []any) {
				var keys []string
				var args []any
				for _, i := range chunks[c] {
					keys = append(keys, calls[i].keys...)
					args = append(append(args, len(calls[i].args)), calls[i].args...)
				}
				return keys, args
			}, replies)
		})
		for c, chunk := range chunks {
			var each []any
			var cerr error
			switch {
			case replies[c] == nil: // never sent
				cerr = err
			case replies[c].Err() != nil:
				cerr = mapErr(replies[c].Err())
			default:
				if each, cerr = replies[c].Slice(); cerr == nil && len(each) != len(chunk) {
					cerr = fmt.Errorf("store: %d replies for %d puts", len(each), len(chunk))
				}
			}
			for k, i := range chunk {
				if cerr != nil {
					out[i].Err = cerr
					continue
				}
				reply, ok := each[k].([]any)
				if !ok {
					out[i].Err = fmt.Errorf("store: put reply is %T, not a list", each[k])
					continue
				}
				out[i].PutResult, out[i].Err = putResult(reply, calls[i].args)
				if out[i].Err == nil && err != nil {
					// Written, but the replicas did not acknowledge it in time.
					out[i].Err = err
				}
			}
		}
	}
	return out
}

// runPipelined runs script n times in one pipeline on c, with the keys and
// arguments call(k) gives, and puts each reply in replies[k]. A script
// Redis does not know yet (NOSCRIPT) is loaded, and the calls that met it
// are sent again: they ran nothing.
func runPipelined(ctx context.Context, c redis.Cmdable, script *redis.Script, n int, call func(k int) ([]string, []any), replies []*redis.Cmd) error {
	pending := make([]int, n)
	for k := range pending {
		pending[k] = k
	}
	for attempt := 0; len(pending) > 0; attempt++ {
		pipe := c.Pipeline()
		for _, k := range pending {
			keys, args := call(k)
			replies[k] = script.EvalSha(ctx, pipe, keys, args...)
		}
		_, _ = pipe.Exec(ctx) // errors are read per command
		var again []int
		for _, k := range pending {
			if err := replies[k].Err(); err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
				again = append(again, k)
			}
		}
		if len(again) == 0 {
			return nil
		}
		if attempt > 0 {
			return fmt.Errorf("store: script still unknown to Redis after loading it")
		}
		if err := script.Load(ctx, c).Err(); err != nil {
			return mapErr(err)
		}
		pending = again
	}
	return nil
}
