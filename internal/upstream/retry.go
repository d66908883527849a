package upstream

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"unicode"
)

// ErrOutOfTime is wrapped by the error of a retry loop that stopped because
// the caller's deadline left no room for another attempt (or the deadline
// cut the last one short): a caller with more time may try again, where a
// caller that ran out of attempts has the upstream's verdict.
var ErrOutOfTime = errors.New("no time left before the deadline for another attempt")

// OutOfTime marks err, a failure its caller did not try again for want of
// time before the deadline, as ErrOutOfTime, so every provider's retry loop
// reports running out of time alike.
func OutOfTime(err error) error {
	if err == nil || errors.Is(err, ErrOutOfTime) {
		return err
	}
	return outOfTime{err}
}

// outOfTime is a failure not retried for want of time. It is the
// failure itself (errors.As finds its *Error) and ErrOutOfTime.
type outOfTime struct{ err error }

func (e outOfTime) Error() string   { return e.err.Error() + " (" + ErrOutOfTime.Error() + ")" }
func (e outOfTime) Unwrap() []error { return []error{e.err, ErrOutOfTime} }

// Text of provider errors is bounded: scrubbing looks at most at
// maxScrubInput bytes and keeps at most maxReasonRunes runes.
const (
	maxScrubInput  = 4096
	maxReasonRunes = 200
	// minScrubLen is the shortest secret Scrub can cut out of a text: a
	// shorter one may occur by chance, inside other words, or in forms
	// nobody can list, so text from a request that carried one is withheld.
	minScrubLen = 8
)

// Withheld replaces provider text that Scrub could not make safe.
const Withheld = "[provider text withheld]"

// Scrub makes provider text safe to put in an error or a log line: each
// secret the request carried is cut out in every form a provider might
// quote it — as sent, in another letter case, URL-escaped, JSON-escaped,
// base64 — control characters are dropped and the length is bounded. If a
// secret is too short to be found reliably (an API key or account secret
// of a few characters), the whole text is withheld. A provider that quotes
// a fragment of a secret, or transforms it otherwise, defeats this: the
// gateway never returns provider text to its callers for that reason.
func Scrub(s string, secrets []string) string {
	if s == "" {
		return ""
	}
	if len(s) > maxScrubInput {
		s = s[:maxScrubInput] // far beyond what is kept: a secret cut here is cut below too
	}
	for _, sec := range secrets {
		if sec == "" {
			continue
		}
		if len(sec) < minScrubLen {
			return Withheld
		}
		for _, form := range secretForms(sec) {
			s = replaceFold(s, form, "[redacted]")
		}
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if r := []rune(s); len(r) > maxReasonRunes {
		s = string(r[:maxReasonRunes]) + "…"
	}
	return strings.TrimSpace(s)
}

// secretForms are the ways a provider may quote sec.
func secretForms(sec string) []string {
	forms := []string{sec, url.QueryEscape(sec), url.PathEscape(sec),
		base64.StdEncoding.EncodeToString([]byte(sec)), base64.RawURLEncoding.EncodeToString([]byte(sec))}
	if b, err := json.Marshal(sec); err == nil {
		escaped := string(b[1 : len(b)-1])
		// PHP's json_encode, as Wialon's servers write it, escapes "/" too.
		forms = append(forms, escaped, strings.ReplaceAll(escaped, "/", `\/`))
	}
	return forms
}

// replaceFold replaces every occurrence of old in s, ignoring letter case,
// with repl.
func replaceFold(s, old, repl string) string {
	if old == "" || len(old) > len(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		if i+len(old) <= len(s) && strings.EqualFold(s[i:i+len(old)], old) {
			b.WriteString(repl)
			i += len(old)
			continue
		}
		b.WriteByte(s[i])
		i++
	}
	return b.String()
}
