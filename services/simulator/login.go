package simulator

import (
	"html/template"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Wialon's token authorization page, login.html (see
// shared/reference/wialon-token-authorization.txt): GET shows a sign-in
// form with what the application asks for; approving it makes a new
// 72-character token for the signed-in user and redirects the browser to
// redirect_uri with access_token (and user_name with flags 0x1). The
// simulator accepts any user name and password.
//
// Where Wialon's behaviour is not documented the simulator chooses, and
// says so: "Deny" redirects to redirect_uri with svc_error=7 (Wialon's docs
// only say errors return to the form itself, with svc_error), and a token
// past its duration answers token/login with error 8.

// tokenMeta is what token/list reports about a token made by login.html.
type tokenMeta struct {
	user      string
	app       string
	flags     int64
	created   time.Time
	activated time.Time
	duration  time.Duration
}

// maxTokenDuration is Wialon's MAX_DURATION (100 days).
const maxTokenDuration = 8_640_000

var loginTemplate = template.Must(template.New("login").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Wialon (simulator): sign in</title>
<style>body{font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto;padding:0 1rem}label{display:block;margin:.6rem 0}</style>
</head><body>
<h1>Wialon simulator</h1>
<p><b>{{.ClientID}}</b> asks for a token with access type <code>{{.AccessType}}</code>{{if .Duration}} for {{.Duration}} seconds{{else}} without time limit{{end}}.</p>
<form method="post" action="login.html">
{{range $k, $v := .Params}}<input type="hidden" name="{{$k}}" value="{{$v}}">
{{end}}<label>User <input name="login" value="{{.User}}" autocomplete="username"></label>
<label>Password <input name="passw" type="password" autocomplete="current-password"></label>
<button name="action" value="allow">Allow</button> <button name="action" value="deny">Deny</button>
</form></body></html>
`))

// loginParams are the login.html parameters the form carries along.
var loginParams = []string{"client_id", "access_type", "activation_time", "duration", "lang", "flags", "user", "redirect_uri", "response_type", "css_url"}

func (s *Simulator) loginPage(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	params := map[string]string{}
	for _, k := range loginParams {
		if q.Has(k) {
			params[k] = q.Get(k)
		}
	}
	user := q.Get("user")
	if user == "" {
		user = "sim_user"
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_ = loginTemplate.Execute(w, map[string]any{
		"ClientID": q.Get("client_id"), "AccessType": orDefault(q.Get("access_type"), "0x100"),
		"Duration": q.Get("duration"), "User": user, "Params": params,
	})
}

func (s *Simulator) loginSubmit(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 1<<16)
	if err := r.ParseForm(); err != nil {
		http.Error(w, "malformed form", http.StatusBadRequest)
		return
	}
	f := r.Form // the form's fields, or login.html's query for a client that posts to it directly
	redirect, err := url.Parse(f.Get("redirect_uri"))
	if err != nil || !redirect.IsAbs() || (redirect.Scheme != "http" && redirect.Scheme != "https") {
		http.Error(w, "redirect_uri must be an absolute http(s) URL (the simulator has no page of its own to return to)", http.StatusBadRequest)
		return
	}
	q := redirect.Query()
	flags, access, duration, ok := parseLoginRequest(f)
	switch {
	case f.Get("action") != "allow":
		q.Set("svc_error", "7")
	case !ok:
		q.Set("svc_error", "4")
	default:
		user := strings.TrimSpace(f.Get("login"))
		if user == "" {
			user = "sim_user"
		}
		token := randomHex(36) // 72 characters, like Wialon's
		now := s.now()
		s.mu.Lock()
		s.tokens[token] = user
		s.issued[token] = tokenMeta{user: user, app: f.Get("client_id"), flags: access, created: now, activated: now, duration: duration}
		s.mu.Unlock()
		q.Set("access_token", token)
		if flags&0x1 != 0 {
			q.Set("user_name", user)
		}
	}
	redirect.RawQuery = q.Encode()
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, redirect.String(), http.StatusFound)
}

// parseLoginRequest reads flags, access_type and duration as login.html
// takes them; ok is false for values Wialon would refuse.
func parseLoginRequest(f url.Values) (flags, access int64, duration time.Duration, ok bool) {
	num := func(k, def string) (int64, bool) {
		n, err := strconv.ParseInt(orDefault(f.Get(k), def), 0, 64)
		return n, err == nil
	}
	flags, ok1 := num("flags", "0")
	access, ok2 := num("access_type", "0x100")
	secs, ok3 := num("duration", "2592000") // Wialon's default: 30 days
	if !ok1 || !ok2 || !ok3 || secs < 0 || secs > maxTokenDuration || (access <= 0 && access != -1) ||
		orDefault(f.Get("response_type"), "token") != "token" {
		return 0, 0, 0, false
	}
	return flags, access, time.Duration(secs) * time.Second, true
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// tokenExpiredLocked reports whether a token made by login.html is past
// its duration. Tokens registered with AddWialonToken never expire.
func (s *Simulator) tokenExpiredLocked(token string, now time.Time) bool {
	m, ok := s.issued[token]
	return ok && m.duration > 0 && !now.Before(m.activated.Add(m.duration))
}

// tokenFlagsLocked is a token's access type: -1 for AddWialonToken's (like
// the tokens customers make with access_type=-1).
func (s *Simulator) tokenFlagsLocked(token string) int64 {
	if m, ok := s.issued[token]; ok {
		return m.flags
	}
	return -1
}
