<?php

declare(strict_types=1);

namespace Swocloud;

/**
 * Every failure of a call to the Route: catch this one to handle them all.
 *
 * It carries the HTTP status (0 when no HTTP answer was read at all) and an
 * error code: the Route's `error` field for an {@see ApiException}
 * (`bad_request`, `unauthorized`, `limit`, `no_such_group`, `unavailable`, …),
 * `network` for a {@see NetworkException}. `getCode()` returns the status too.
 */
class SwocloudException extends \RuntimeException
{
    /**
     * @param string          $message   a human-readable description
     * @param int             $status    the HTTP status, 0 when there was none
     * @param string          $errorCode a short machine-readable code
     * @param \Throwable|null $previous  the underlying failure, if any
     */
    public function __construct(
        string $message,
        private readonly int $status,
        private readonly string $errorCode,
        ?\Throwable $previous = null,
    ) {
        parent::__construct($message, $status, $previous);
    }

    /**
     * The HTTP status of the Route's answer; 0 when none was read (the Route
     * could not be reached, or the connection failed or timed out).
     */
    public function getStatus(): int
    {
        return $this->status;
    }

    /**
     * A short machine-readable code: the Route's `error` field (for example
     * `limit` or `no_such_group`), or `network`.
     */
    public function getErrorCode(): string
    {
        return $this->errorCode;
    }
}
