package upstream

import (
	"encoding/base64"
	"net/url"
	"strings"
	"testing"
)

func TestScrub(t *testing.T) {
	const secret = `Sec/ret+Value"0123` // 18 characters with / + and a quote
	tests := []struct {
		name    string
		text    string
		secrets []string
		want    string
	}{
		{"as sent", "bad token " + secret + " here", []string{secret}, "bad token [redacted] here"},
		{"another case", "bad token " + strings.ToUpper(secret), []string{secret}, "bad token [redacted]"},
		{"URL-escaped", "sid=" + url.QueryEscape(secret), []string{secret}, "sid=[redacted]"},
		{"path-escaped", "/x/" + url.PathEscape(secret), []string{secret}, "/x/[redacted]"},
		{"JSON-escaped", `{"token":"Sec\/ret+Value\"0123"}`, []string{secret}, `{"token":"[redacted]"}`},
		{"base64", "auth " + base64.StdEncoding.EncodeToString([]byte(secret)), []string{secret}, "auth [redacted]"},
		{"a short secret withholds the text", "bad key k9 for account 1", []string{"k9"}, Withheld},
		{"a one-character secret withholds the text", "anything", []string{"x"}, Withheld},
		{"empty secrets are ignored", "session expired", []string{""}, "session expired"},
		{"control characters", "a\nb\x00c", nil, "a b c"},
		{"bounded", strings.Repeat("é", 300), nil, strings.Repeat("é", 200) + "…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Scrub(tt.text, tt.secrets); got != tt.want {
				t.Errorf("Scrub(%q) = %q, want %q", tt.text, got, tt.want)
			}
		})
	}
}
