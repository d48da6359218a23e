<?php

declare(strict_types=1);

namespace Swocloud;

/**
 * The Route answered, and refused: an HTTP status outside 2xx (or a 2xx whose
 * body was not the JSON object expected, code `bad_response`).
 *
 * The Route's refusals are `{"error":"<code>","message":"<text>"}`; the code
 * and message are kept apart here, and the whole decoded body too:
 *
 * | status | code            | when                                                  |
 * |--------|-----------------|-------------------------------------------------------|
 * | 400    | `bad_request`   | a bad uid, group name or body                         |
 * | 401    | `unauthorized`  | `api_key` missing or wrong; a bad token for `/route`  |
 * | 403    | `limit`         | groups per user or members per group reached          |
 * | 404    | `no_such_group` | a group send to a group without members               |
 * | 503    | `unavailable`   | Redis could not store the message: nothing was sent   |
 */
final class ApiException extends SwocloudException
{
    /**
     * @param int                  $status        the HTTP status
     * @param string               $errorCode     the Route's `error` field (or `http_<status>` without one)
     * @param string               $serverMessage the Route's `message` field ('' without one)
     * @param array<string, mixed> $body          the decoded answer ([] when it was not a JSON object)
     * @param string               $method        the request's method, for the message
     * @param string               $path          the request's path, for the message
     */
    public function __construct(
        int $status,
        string $errorCode,
        private readonly string $serverMessage,
        private readonly array $body,
        string $method = '',
        string $path = '',
    ) {
        $what = trim("$method $path");
        $text = "swocloud: $what: HTTP $status $errorCode"
            . ($serverMessage !== '' ? ": $serverMessage" : '');
        parent::__construct($text, $status, $errorCode);
    }

    /**
     * The Route's `message` field: what was wrong, in words ('' when absent).
     */
    public function getServerMessage(): string
    {
        return $this->serverMessage;
    }

    /**
     * The Route's whole answer, decoded ([] when it was not a JSON object).
     *
     * @return array<string, mixed>
     */
    public function getBody(): array
    {
        return $this->body;
    }
}
