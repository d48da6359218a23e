<?php

declare(strict_types=1);

namespace Swocloud;

/**
 * No HTTP answer: the Route could not be reached (refused, unresolvable,
 * TLS failure), or the connection broke or timed out before an answer was
 * read. Status 0, code `network`.
 *
 * A write verb that fails this way may or may not have been applied; a
 * `sendToUid` retried with the same `ref` (and `from`) is stored once.
 */
final class NetworkException extends SwocloudException
{
    /**
     * @param string          $message  what failed, with the URL
     * @param \Throwable|null $previous the underlying failure, if any
     */
    public function __construct(string $message, ?\Throwable $previous = null)
    {
        parent::__construct($message, 0, 'network', $previous);
    }
}
