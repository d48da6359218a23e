<?php

declare(strict_types=1);

namespace Swocloud;

/**
 * A client of one swocloud Route's HTTP API: GatewayClient's verbs for a PHP
 * backend (push to users and groups, manage membership, presence, kick).
 *
 *     $client = new Client('http://127.0.0.1:9500', 'the-api-key');
 *     $client->joinGroup('alice', 'room:42');
 *     $client->sendToGroup('room:42', ['text' => 'hi'], from: 'system');
 *
 * Every call is one HTTP request (two or more for
 * {@see Client::getUidListByGroup()}, which follows the pages) over PHP's
 * own `http://` stream wrapper: no extension beyond a bare php-cli
 * (`https://` needs ext-openssl). An instance holds only its settings, so it
 * may be shared and reused freely. For GatewayClient's static style, see
 * {@see Gateway}.
 *
 * Messages (`$data`) are any JSON-encodable value, delivered as that JSON:
 * a string, a number, a list, or an object. A PHP array with string keys
 * becomes an object; an empty array becomes `[]`, so pass `new \stdClass()`
 * (or `(object) []`) for `{}`.
 *
 * Failures throw: {@see ApiException} when the Route refused (HTTP status
 * and its `error` code and `message`), {@see NetworkException} when no answer
 * came; both are {@see SwocloudException}s. A value that cannot be encoded
 * as JSON throws \InvalidArgumentException before anything is sent.
 */
final class Client
{
    /** The Route's base URL, without a trailing slash. */
    private readonly string $base;

    /**
     * @param string      $routeUrl the Route, e.g. `http://127.0.0.1:9500` (its admin
     *                              address when it has `admin_listen`)
     * @param string|null $apiKey   the Route's `api_key`, sent as `Authorization: Bearer`;
     *                              null or '' when it has none
     * @param float       $timeout  seconds allowed to connect, and for each read
     *
     * @throws \InvalidArgumentException when the URL is not http:// or https://
     */
    public function __construct(
        string $routeUrl,
        private readonly ?string $apiKey = null,
        private readonly float $timeout = 5.0,
    ) {
        $scheme = strtolower((string) parse_url($routeUrl, PHP_URL_SCHEME));
        if (($scheme !== 'http' && $scheme !== 'https') || parse_url($routeUrl, PHP_URL_HOST) === null) {
            throw new \InvalidArgumentException("swocloud: not an http(s) URL: $routeUrl");
        }
        $this->base = rtrim($routeUrl, '/');
    }

    /** The Route's base URL this client talks to. */
    public function getRouteUrl(): string
    {
        return $this->base;
    }

    /**
     * Sends a message to every connection of a user (all devices, any IM
     * server), once it is stored in the user's inbox: a user who is offline
     * gets it at its next connect. The user receives
     * `{"from":…,"data":…,"seq":N,"id":"…"}`.
     *
     * Given a list of uids, sends to each in turn (one request each) and
     * returns the answers keyed by uid; the first failure throws.
     *
     * @param string|list<string> $uid  the user, or several
     * @param mixed               $data the message (any JSON value)
     * @param string|null         $from the sender shown to the user (the Route says `api` when null)
     * @param string|null         $ref  the caller's label: a retry with the same ref (and from)
     *                                  is stored once and answered with the first copy's seq and id
     *
     * @return array<string, mixed> `{"uid","id","seq","epoch","status"}`, status `delivered`
     *                              (handed to the user's IM servers) or `queued` (offline);
     *                              for a list of uids: uid => that answer
     *
     * @throws ApiException     400 `bad_request` (bad uid); 503 `unavailable` (not stored, nothing sent)
     * @throws NetworkException when the Route did not answer
     */
    public function sendToUid(string|array $uid, mixed $data, ?string $from = null, ?string $ref = null): array
    {
        if (is_array($uid)) {
            $answers = [];
            foreach ($uid as $one) {
                $answers[(string) $one] = $this->sendToUid((string) $one, $data, $from, $ref);
            }
            return $answers;
        }
        return $this->post('/api/send', self::message(['uid' => $uid], $data, $from, $ref));
    }

    /**
     * Sends a message to every member of a group: one copy to each IM
     * server holding at least one online member, which delivers it to every
     * connection of its members. Members receive
     * `{"group":G,"from":…,"data":…,"gseq":N,"id":"…"}`, with a per-group,
     * gap-free `gseq`; offline members find it when they reconnect (while it
     * is still in the group's bounded stream).
     *
     * Given a list of groups, sends to each in turn and returns the answers
     * keyed by group; the first failure throws.
     *
     * @param string|list<string> $group the group, or several
     * @param mixed               $data  the message (any JSON value)
     * @param string|null         $from  the sender shown to the members
     * @param string|null         $ref   the caller's label, passed on (the Route does not
     *                                   deduplicate group sends by it today)
     *
     * @return array<string, mixed> `{"group","gseq","id","servers"}`, servers: how many IM
     *                              servers it went to; for a list: group => that answer
     *
     * @throws ApiException     404 `no_such_group` (no members); 400 `bad_request` (bad name)
     * @throws NetworkException when the Route did not answer
     */
    public function sendToGroup(string|array $group, mixed $data, ?string $from = null, ?string $ref = null): array
    {
        if (is_array($group)) {
            $answers = [];
            foreach ($group as $one) {
                $answers[(string) $one] = $this->sendToGroup((string) $one, $data, $from, $ref);
            }
            return $answers;
        }
        return $this->post('/api/groups/send', self::message(['group' => $group], $data, $from, $ref));
    }

    /**
     * Makes a user a member of a group (every device of the user receives
     * the group's messages). Membership is kept in Redis, whether or not the
     * user is online; joining twice is harmless. The argument order is
     * GatewayWorker's (`joinGroup($client_id, $group)`), with a uid.
     *
     * Group names are 1 to 64 characters of `A-Z a-z 0-9 _ . : -`.
     *
     * @param string $uid   the user
     * @param string $group the group
     *
     * @return array<string, mixed> `{"group","uid","members"}`, members: the group's size now
     *
     * @throws ApiException     400 `bad_request` (bad name or uid); 403 `limit` (groups per
     *                          user or members per group reached)
     * @throws NetworkException when the Route did not answer
     */
    public function joinGroup(string $uid, string $group): array
    {
        return $this->post('/api/groups/join', ['group' => $group, 'uid' => $uid]);
    }

    /**
     * Removes a user from a group; leaving a group one is not in is harmless.
     *
     * @param string $uid   the user
     * @param string $group the group
     *
     * @return array<string, mixed> `{"group","uid","members"}`, members: the group's size now
     *
     * @throws ApiException     400 `bad_request` (bad name or uid)
     * @throws NetworkException when the Route did not answer
     */
    public function leaveGroup(string $uid, string $group): array
    {
        return $this->post('/api/groups/leave', ['group' => $group, 'uid' => $uid]);
    }

    /**
     * How many of a group's members are online now: the Route's `online`,
     * which counts a member once per IM server worker holding one of its
     * connections (a member with two devices on two workers counts twice;
     * two connections on one worker count once). 0 for a group without
     * members or without online ones.
     *
     * @param string $group the group
     *
     * @throws ApiException     400 `bad_request` (bad name)
     * @throws NetworkException when the Route did not answer
     */
    public function getClientCountByGroup(string $group): int
    {
        return (int) ($this->getGroupMembers($group)['online'] ?? 0);
    }

    /**
     * Every member of a group (online or not), following the Route's pages
     * to the end; each uid once. [] for a group without members. For very
     * large groups, page with {@see Client::getGroupMembers()} instead.
     *
     * @param string $group the group
     *
     * @return list<string>
     *
     * @throws ApiException     400 `bad_request` (bad name); `bad_response` if the Route
     *                          hands back a cursor it already gave
     * @throws NetworkException when the Route did not answer
     */
    public function getUidListByGroup(string $group): array
    {
        $uids = [];
        $seen = [];
        $cursor = null;
        do {
            $page = $this->getGroupMembers($group, $cursor);
            foreach ($page['members'] ?? [] as $uid) {
                $uids[(string) $uid] = true;
            }
            $cursor = isset($page['cursor']) ? (string) $page['cursor'] : null;
            if ($cursor !== null) {
                if (isset($seen[$cursor])) {
                    throw new ApiException(200, 'bad_response', "cursor $cursor repeated", $page, 'GET', '/api/groups/members');
                }
                $seen[$cursor] = true;
            }
        } while ($cursor !== null);
        return array_map('strval', array_keys($uids));
    }

    /**
     * One page of a group's members.
     *
     * @param string      $group  the group
     * @param string|null $cursor null for the first page, then the previous page's `cursor`
     *
     * @return array<string, mixed> `{"group","count","online","members":[uids…],"cursor"}`:
     *                              count: all members, online: those online, cursor:
     *                              the next page's, null on the last page
     *
     * @throws ApiException     400 `bad_request` (bad name or cursor)
     * @throws NetworkException when the Route did not answer
     */
    public function getGroupMembers(string $group, ?string $cursor = null): array
    {
        $query = ['group' => $group];
        if ($cursor !== null) {
            $query['cursor'] = $cursor;
        }
        return $this->get('/api/groups/members', $query);
    }

    /**
     * Whether a user has at least one connection open on any IM server.
     * (GatewayWorker answers 1 or 0; a bool tests the same way.)
     *
     * @param string $uid the user
     *
     * @throws ApiException     400 `bad_request` (bad uid)
     * @throws NetworkException when the Route did not answer
     */
    public function isUidOnline(string $uid): bool
    {
        return (bool) ($this->getOnline($uid)['online'] ?? false);
    }

    /**
     * A user's presence in full.
     *
     * @param string $uid the user
     *
     * @return array<string, mixed> `{"uid","online","connections","servers":[…]}`
     *
     * @throws ApiException     400 `bad_request` (bad uid)
     * @throws NetworkException when the Route did not answer
     */
    public function getOnline(string $uid): array
    {
        return $this->get('/api/online', ['uid' => $uid]);
    }

    /**
     * Closes every connection of a user, on every IM server, with close
     * code 4000 and the reason. The user may connect again (it is no ban:
     * stop minting its tokens for that).
     *
     * @param string      $uid    the user
     * @param string|null $reason the close reason the user's clients see (the Route keeps
     *                            100 characters; `kicked` when null)
     *
     * @return array<string, mixed> `{"uid","servers"}`, servers: how many IM servers were told
     *
     * @throws ApiException     400 `bad_request` (bad uid)
     * @throws NetworkException when the Route did not answer
     */
    public function closeUid(string $uid, ?string $reason = null): array
    {
        $body = ['uid' => $uid];
        if ($reason !== null) {
            $body['reason'] = $reason;
        }
        return $this->post('/api/kick', $body);
    }

    /**
     * `GET /route`: the IM server a user should connect to, as the user's
     * own client would ask (no api_key; the token is the credential).
     *
     * @param string $uid   the user
     * @param string $token a user token for it ({@see Token::user()})
     *
     * @return array<string, mixed> `{"ip","port","token","url","serviceName"}`: connect to `url`
     *
     * @throws ApiException     401 `unauthorized` (bad or expired token); 503 `no_server`
     * @throws NetworkException when the Route did not answer
     */
    public function routeFor(string $uid, string $token): array
    {
        return $this->get('/route', ['uid' => $uid, 'token' => $token]);
    }

    /**
     * `GET` any path of the Route's API, for what has no verb here.
     *
     * @param string                $path  e.g. `/api/message`
     * @param array<string, string> $query the query parameters
     *
     * @return array<string, mixed> the decoded answer
     *
     * @throws ApiException     on a status outside 2xx
     * @throws NetworkException when the Route did not answer
     */
    public function get(string $path, array $query = []): array
    {
        $pairs = [];
        foreach ($query as $key => $value) {
            $pairs[] = self::queryEncode((string) $key) . '=' . self::queryEncode((string) $value);
        }
        return $this->request('GET', $path . ($pairs === [] ? '' : '?' . implode('&', $pairs)), null);
    }

    /**
     * `POST` a JSON body to any path of the Route's API.
     *
     * @param string               $path e.g. `/api/broadcast`
     * @param array<string, mixed> $body encoded as a JSON object
     *
     * @return array<string, mixed> the decoded answer
     *
     * @throws ApiException              on a status outside 2xx
     * @throws NetworkException          when the Route did not answer
     * @throws \InvalidArgumentException when the body cannot be encoded as JSON
     */
    public function post(string $path, array $body): array
    {
        try {
            $json = json_encode(
                (object) $body,
                JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR,
            );
        } catch (\JsonException $e) {
            throw new \InvalidArgumentException('swocloud: not JSON-encodable: ' . $e->getMessage(), 0, $e);
        }
        return $this->request('POST', $path, $json);
    }

    /**
     * One request; the decoded JSON object of a 2xx answer.
     *
     * @return array<string, mixed>
     */
    private function request(string $method, string $pathAndQuery, ?string $json): array
    {
        $headers = ['Accept: application/json', 'Connection: close', 'User-Agent: swocloud-php/1'];
        if ($json !== null) {
            $headers[] = 'Content-Type: application/json';
        }
        if ($this->apiKey !== null && $this->apiKey !== '') {
            $headers[] = 'Authorization: Bearer ' . $this->apiKey;
        }
        $http = [
            'method' => $method,
            'header' => implode("\r\n", $headers),
            'ignore_errors' => true, // the body of a 4xx/5xx is the Route's reason
            'follow_location' => 0,
            'timeout' => $this->timeout,
        ];
        if ($json !== null) {
            $http['content'] = $json;
        }
        $context = stream_context_create(['http' => $http]);
        $url = $this->base . $pathAndQuery;

        $warning = '';
        set_error_handler(static function (int $_, string $message) use (&$warning): bool {
            $warning = $message;
            return true;
        });
        try {
            $t0 = microtime(true);
            $stream = fopen($url, 'rb', false, $context);
            if ($stream === false) {
                $why = preg_replace('/^fopen\([^)]*\):\s*/', '', $warning) ?: 'no HTTP answer';
                if (microtime(true) - $t0 >= $this->timeout * 0.9) {
                    $why = "no answer within {$this->timeout} s ($why)";
                }
                throw new NetworkException("swocloud: $method $url: $why");
            }
            try {
                $responseHeaders = stream_get_meta_data($stream)['wrapper_data'] ?? [];
                $body = stream_get_contents($stream);
                $timedOut = stream_get_meta_data($stream)['timed_out'];
            } finally {
                fclose($stream);
            }
        } finally {
            restore_error_handler();
        }
        $status = 0;
        $length = null;
        foreach (is_array($responseHeaders) ? $responseHeaders : [] as $line) {
            if (preg_match('#^HTTP/\S+\s+(\d{3})#', (string) $line, $m) === 1) {
                $status = (int) $m[1];
                $length = null;
            } elseif (preg_match('#^content-length:\s*(\d+)#i', (string) $line, $m) === 1) {
                $length = (int) $m[1];
            }
        }
        if ($timedOut) {
            throw new NetworkException("swocloud: $method $url: timed out after {$this->timeout} s");
        }
        if ($body === false || $status === 0 || ($length !== null && strlen($body) < $length)) {
            $why = $warning !== '' ? $warning : 'the connection closed before the whole answer';
            throw new NetworkException("swocloud: $method $url: $why");
        }

        $decoded = json_decode($body, true);
        $object = is_array($decoded) && !array_is_list($decoded) ? $decoded : [];
        $path = (string) parse_url($url, PHP_URL_PATH);
        if ($status < 200 || $status > 299) {
            $code = isset($object['error']) && is_string($object['error']) ? $object['error'] : "http_$status";
            $message = isset($object['message']) && is_string($object['message'])
                ? $object['message']
                : ($object === [] ? trim(substr($body, 0, 200)) : '');
            throw new ApiException($status, $code, $message, $object, $method, $path);
        }
        if ($object === [] && $decoded !== []) {
            throw new ApiException($status, 'bad_response', 'not a JSON object: ' . substr($body, 0, 200), [], $method, $path);
        }
        return $object;
    }

    /**
     * A message body: `$target` plus data, and from and ref when given.
     *
     * @param array<string, string> $target
     *
     * @return array<string, mixed>
     */
    private static function message(array $target, mixed $data, ?string $from, ?string $ref): array
    {
        $body = $target + ['data' => $data];
        if ($from !== null) {
            $body['from'] = $from;
        }
        if ($ref !== null) {
            $body['ref'] = $ref;
        }
        return $body;
    }

    /**
     * Percent-encodes for a query string (the Route decodes query values).
     */
    private static function queryEncode(string $value): string
    {
        return rawurlencode($value);
    }
}
