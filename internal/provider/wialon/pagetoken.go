package wialon

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// A history page token says where the next page starts: the time of the
// last message returned and how many messages of that second were
// returned already (several can share one second), bound to the unit and
// range it was made for. It is not secret and not signed: a caller can
// only ask for positions of its own credential with it.
//
//	base64url("w1:<unix seconds>:<skip>:<binding>")

// cursor is where a page starts.
type cursor struct {
	from time.Time
	// skip is how many messages at time from were returned before.
	skip int
}

// maxSkip bounds skip: more messages in one second than a page holds
// could never be paged past.
const maxSkip = DefaultHistoryPage

func pageBinding(unit string, from, to time.Time) string {
	sum := sha256.Sum256([]byte(unit + "\x00" + strconv.FormatInt(from.Unix(), 10) + "\x00" + strconv.FormatInt(to.Unix(), 10)))
	return hex.EncodeToString(sum[:8])
}

func errPageToken(why string) error {
	return &provider.FieldError{Field: "page_token", Description: why + ": pass next_page_token from the previous reply unchanged, with the same unit_id, start_time and end_time"}
}

func parsePageToken(token, unit string, from, to time.Time) (cursor, error) {
	b, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return cursor{}, errPageToken("not a page token")
	}
	f := strings.Split(string(b), ":")
	if len(f) != 4 || f[0] != "w1" {
		return cursor{}, errPageToken("not a page token")
	}
	at, err1 := strconv.ParseInt(f[1], 10, 64)
	skip, err2 := strconv.Atoi(f[2])
	if err1 != nil || err2 != nil || skip < 0 || skip > maxSkip {
		return cursor{}, errPageToken("not a page token")
	}
	if f[3] != pageBinding(unit, from, to) {
		return cursor{}, errPageToken("the token belongs to another unit or range")
	}
	c := cursor{from: time.Unix(at, 0).UTC(), skip: skip}
	if c.from.Before(from.Truncate(time.Second)) || c.from.After(to) {
		return cursor{}, errPageToken("the token is outside the range")
	}
	return c, nil
}

// nextPageToken is the token of the page after msgs, which started at cur.
func nextPageToken(msgs []Message, cur cursor, unit string, from, to time.Time) string {
	last := msgs[len(msgs)-1].Time
	skip := 0
	for i := len(msgs) - 1; i >= 0 && msgs[i].Time.Equal(last); i-- {
		skip++
	}
	if last.Equal(cur.from) {
		skip = len(msgs) // the whole page was that one second, after those skipped before
	}
	skip = min(skip, maxSkip)
	return base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "w1:%d:%d:%s", last.Unix(), skip, pageBinding(unit, from, to)))
}
