package wialon

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"time"
)

// TokenInfo is what Wialon's token/list records about one token: never the
// token itself.
type TokenInfo struct {
	// ActivationTime is when the token started to work ("at").
	ActivationTime time.Time
	// Duration is how long it works after activation ("dur"); 0 is unlimited.
	Duration time.Duration
	// AccessFlags are its rights ("fl"); -1 is unlimited.
	AccessFlags int64
	// LastUse is when it was last used ("ll"), if Wialon says.
	LastUse time.Time
}

// ExpireTime is when the token stops working; zero for an unlimited token.
func (t TokenInfo) ExpireTime() time.Time {
	if t.Duration <= 0 {
		return time.Time{}
	}
	return t.ActivationTime.Add(t.Duration)
}

// TokenInfo looks token up among the tokens of the session's user
// (token/list) and reports what Wialon records about it; found is false
// when it is not listed. token/list answers with every token of the user,
// the token strings ("h") included: they are compared and dropped here, and
// nothing but the matching token's metadata leaves this function. Only a
// token with token-management rights (access type -1) may call token/list:
// others get an error of upstream.KindAccessDenied.
func (c *Client) TokenInfo(ctx context.Context, baseURL, sid, token string) (info TokenInfo, found bool, err error) {
	const svc = "token/list"
	body, err := c.call(ctx, baseURL, sid, svc, []byte("{}"), sid, token)
	if err != nil {
		return TokenInfo{}, false, err
	}
	var list []struct {
		H   string `json:"h"`
		At  int64  `json:"at"`
		Dur int64  `json:"dur"`
		Fl  int64  `json:"fl"`
		LL  int64  `json:"ll"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return TokenInfo{}, false, malformed(svc, typeError(err))
	}
	for _, t := range list {
		if len(t.H) != len(token) || subtle.ConstantTimeCompare([]byte(t.H), []byte(token)) != 1 {
			continue
		}
		if t.At < 0 || t.Dur < 0 {
			return TokenInfo{}, false, malformed(svc, errors.New("negative time"))
		}
		info = TokenInfo{ActivationTime: time.Unix(t.At, 0).UTC(), Duration: time.Duration(t.Dur) * time.Second, AccessFlags: t.Fl}
		if t.LL > 0 {
			info.LastUse = time.Unix(t.LL, 0).UTC()
		}
		return info, true, nil
	}
	return TokenInfo{}, false, nil
}
