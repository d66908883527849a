package app

import (
	"context"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// InspectWialon logs in with token, asks Wialon about the token on that
// session (token/list: its expiry and rights, which only a token with
// token-management rights may read) and logs out. Only the login decides
// whether the token is good: a token/list that is refused (the normal case
// for a least-privilege token) or fails leaves expiry and rights unknown.
func (v *ProviderValidator) InspectWialon(ctx context.Context, baseURL, token string) (credentials.WialonTokenInfo, error) {
	sess, err := v.Wialon.Login(ctx, baseURL, token)
	if err != nil {
		return credentials.WialonTokenInfo{}, err
	}
	defer func() {
		// Best effort, even when ctx has ended: the session idles out anyway.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = v.Wialon.Logout(lctx, baseURL, sess.SID)
	}()
	out := credentials.WialonTokenInfo{User: sess.User}
	info, found, err := v.Wialon.TokenInfo(ctx, baseURL, sess.SID, token)
	if err == nil && found {
		out.Listed, out.ExpireTime, out.AccessFlags = true, info.ExpireTime(), info.AccessFlags
	}
	return out, nil
}
